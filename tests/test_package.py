"""Package hygiene: ``import moekit`` stays light and the public API is importable."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, torch; before = set(sys.modules); import moekit; new = set(sys.modules) - before; "
        "heavy = [m for m in ('transformers', 'matplotlib', 'safetensors', 'tqdm', 'sklearn', 'rich', 'scipy') "
        "if m in new]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import moekit pulled in optional dependencies: {out}"


def test_public_api():
    import moekit

    for name in moekit.__all__:
        assert hasattr(moekit, name), name
