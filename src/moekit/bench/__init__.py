"""Benchmarks (``moekit bench``). Ratios against the floor, taken in the same run; see docs/benchmarks.md."""
