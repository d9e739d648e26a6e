"""Interleaved timing: each repeat times every implementation once, so that ratios compare neighbours."""

from __future__ import annotations

import gc
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


def interleaved(
    fns: dict[str, Callable[[], object]],
    floor: str | Callable[[], float],
    repeats: int,
    warmup: int = 2,
    progress: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time every function once per repeat, in turn. ``floor`` names the function whose time is the denominator, or
    is a callable giving a fixed floor time (the memory floor for decode shapes)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing([], []) for name in fns}
    for _ in range(repeats):
        gc.collect()
        row = {name: time_once(fn) for name, fn in fns.items()}
        base = row[floor] if isinstance(floor, str) else floor()
        for name, t in row.items():
            out[name].times.append(t)
            out[name].ratios.append(t / base)
        if progress is not None:
            progress()
    return out


def copy_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second moved (read + write) by a large tensor copy."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(time_once(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * num_bytes / best
