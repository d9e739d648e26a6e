"""Interleaved timing: each repeat times every implementation once, so that ratios compare neighbours.

Two things keep the order of the implementations from biasing the result:

- a **cache sweep** before every timed call: a read over a buffer larger than the last-level cache, so every call
  starts with the same cold, clean caches. Without it the call that follows one which wrote a large buffer (Hugging
  Face ``batched_mm`` copies the expert weights per token: 70-550 MB at decode) pays for writing back that
  buffer's dirty cache lines, and the call that follows one which read the same weights finds them warm;
- a **rotating order**: repeat ``r`` starts at implementation ``r mod n``, so each one follows each other one.
"""

from __future__ import annotations

import gc
import glob
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    times: list[float]  # seconds, one per repeat
    ratios: list[float]  # time / floor time of the same repeat

    @staticmethod
    def _iqr(v: list[float]) -> tuple[float, float]:
        if len(v) < 4:
            return min(v), max(v)
        q = statistics.quantiles(v, n=4)
        return q[0], q[2]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_iqr(self) -> tuple[float, float]:
        return self._iqr(self.ratios)

    @property
    def time_iqr(self) -> tuple[float, float]:
        return self._iqr(self.times)


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """The largest CPU cache (bytes) that sysfs reports for cpu0; ``default`` where it reports none."""
    best = 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if unit != 1 else text
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best or default


class CacheSweep:
    """``sweep()`` reads a float32 buffer of ``num_bytes`` (default: twice the last-level cache, at least 64 MiB):
    afterwards the caches hold only clean lines of that buffer. Reading, not writing, so the sweep itself leaves
    nothing dirty behind."""

    def __init__(self, num_bytes: int | None = None) -> None:
        if num_bytes is None:
            num_bytes = max(2 * last_level_cache_bytes(), 64 * 2**20)
        if num_bytes < 4:
            raise ValueError(f"CacheSweep: num_bytes must be >= 4, got {num_bytes}")
        self.buffer = torch.ones(num_bytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.sum()


def interleaved(
    fns: dict[str, Callable[[], object]],
    floor: str | Callable[[], float],
    repeats: int,
    warmup: int = 2,
    progress: Callable[[], None] | None = None,
    sweep: Callable[[], None] | bool = True,
    rotate: bool = True,
) -> dict[str, Timing]:
    """Time every function once per repeat, in turn. ``floor`` names the function whose time is the denominator, or
    is a callable giving a fixed floor time (the memory floor for decode shapes). ``sweep``: run before every timed
    call (untimed); True: a :class:`CacheSweep`, False: none. ``rotate``: start repeat ``r`` at function ``r mod n``
    (see the module docstring)."""
    if sweep is True:
        sweep = CacheSweep()
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing([], []) for name in fns}
    for r in range(repeats):
        gc.collect()
        order = names[r % len(names):] + names[: r % len(names)] if rotate and names else names
        row = {}
        for name in order:
            if sweep:
                sweep()
            row[name] = time_once(fns[name])
        row = {name: row[name] for name in names}
        base = row[floor] if isinstance(floor, str) else floor()
        for name, t in row.items():
            out[name].times.append(t)
            out[name].ratios.append(t / base)
        if progress is not None:
            progress()
    return out


def _buffer(num_bytes: int, hugepages: bool) -> torch.Tensor:
    if hugepages:
        from ..hugepages import empty

        return empty(num_bytes // 4)
    return torch.empty(num_bytes // 4, dtype=torch.float32)


def copy_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5, hugepages: bool = False) -> float:
    """Bytes per second moved (read + write) by a large tensor copy: ``2 * num_bytes / best time``. ``hugepages``:
    both buffers on huge pages (:mod:`moekit.hugepages`), as the weights are when the benchmark puts them there."""
    src = _buffer(num_bytes, hugepages).uniform_()
    dst = _buffer(num_bytes, hugepages)
    dst.copy_(src)
    best = min(time_once(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * num_bytes / best


def read_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5, hugepages: bool = False) -> float:
    """Bytes per second read by a large tensor reduction (``sum``: one add per element, so bound by the reads):
    ``num_bytes / best time``. ``hugepages`` as in :func:`copy_bandwidth`."""
    src = _buffer(num_bytes, hugepages).uniform_()
    src.sum()
    best = min(time_once(src.sum) for _ in range(repeats))
    return num_bytes / best
