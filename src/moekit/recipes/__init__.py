"""End-to-end recipes built on moekit (each imports its optional dependencies lazily)."""
