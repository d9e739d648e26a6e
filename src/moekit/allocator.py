"""Keep large CPU buffers in glibc's heap instead of mapping and unmapping them on every call.

glibc's ``malloc`` serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB to 32 MiB, adapting) with a fresh ``mmap``
and gives them back with ``munmap`` on free. An MoE layer allocates several tensors of tens of MiB per call (the
dispatched rows, the hidden activations, the gathered outputs); with the default policy each one is page-faulted
and zeroed by the kernel again on every call, which measured as 25-40% of a fine-grained layer's time on a 2-core
CPU (docs/performance.md). tcmalloc avoids this; :func:`tune_glibc_malloc` gets the same effect without installing
anything, by raising the mmap and trim thresholds with ``mallopt``.

This changes a process-wide setting, so moekit never calls it on import: call it once at the start of a program
(the ``moekit`` commands that time or train do, unless told not to). Memory freed by Python is then kept by the
process for reuse instead of being returned to the OS at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

_tuned: dict[str, int] | None = None


def tune_glibc_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds (bytes); returns True when applied, False where the C library is not
    glibc (macOS, musl, Windows) or ``mallopt`` refused. Idempotent."""
    global _tuned
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"tune_glibc_malloc: {name} must be a non-negative int (bytes), got {value!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc caps M_MMAP_THRESHOLD at HEAP_MAX (32 MiB on 64-bit) for its own adaptation, but accepts larger values
    # set explicitly up to INT_MAX.
    ok = mallopt(M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1)) == 1
    ok = mallopt(M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1 and ok
    if ok:
        _tuned = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
    return ok


def glibc_malloc_tuned() -> bool:
    """Whether :func:`tune_glibc_malloc` has been applied in this process."""
    return _tuned is not None
