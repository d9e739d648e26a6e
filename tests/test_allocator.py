"""moekit.allocator: explicit, validated, idempotent; never applied on import."""

import subprocess
import sys

import pytest


def test_import_does_not_tune_and_call_does():
    code = ("import moekit, moekit.allocator as a; assert not a.glibc_malloc_tuned(); "
            "r = a.tune_glibc_malloc(); r2 = a.tune_glibc_malloc(); assert r == r2; "
            "assert a.glibc_malloc_tuned() == r; print(r)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import platform

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.stdout.strip() == str(expected)


@pytest.mark.parametrize("kw", [{"mmap_threshold": -1}, {"trim_threshold": 1.5}, {"mmap_threshold": True}])
def test_bad_thresholds_are_rejected(kw):
    from moekit.allocator import tune_glibc_malloc

    with pytest.raises(ValueError, match="non-negative int"):
        tune_glibc_malloc(**kw)
