"""moekit.bench.timing: interleaving order, the cache sweep, bandwidth figures."""

from __future__ import annotations

import pytest

from moekit.bench import timing


def test_interleaved_rotates_and_sweeps_before_every_call():
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    res = timing.interleaved(fns, "a", repeats=3, warmup=0, sweep=lambda: log.append("sweep"))
    assert log == ["sweep", "a", "sweep", "b", "sweep", "c",
                   "sweep", "b", "sweep", "c", "sweep", "a",
                   "sweep", "c", "sweep", "a", "sweep", "b"]
    assert list(res) == ["a", "b", "c"] and all(len(t.times) == 3 for t in res.values())
    assert res["a"].ratios == [1.0, 1.0, 1.0]  # each repeat's floor is that repeat's own time of "a"


def test_interleaved_fixed_order_without_sweep():
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "ab"}
    timing.interleaved(fns, lambda: 1.0, repeats=2, warmup=1, sweep=False, rotate=False)
    assert log == ["a", "b", "a", "b", "a", "b"]


def test_cache_sweep_size_and_validation():
    assert timing.CacheSweep(4096).buffer.numel() == 1024
    assert timing.CacheSweep().buffer.numel() * 4 >= 64 * 2**20
    with pytest.raises(ValueError, match="num_bytes"):
        timing.CacheSweep(0)
    assert timing.last_level_cache_bytes() > 0


def test_bandwidths_positive_and_floor_takes_the_larger():
    from moekit.bench.layer_bench import memory_bandwidth

    assert timing.read_bandwidth(2**20, repeats=2) > 0
    assert timing.copy_bandwidth(2**20, repeats=2) > 0
    bw, name = memory_bandwidth()
    read, copy = (float(part.split()[-1]) for part in name.split(":")[1].split(","))
    assert abs(bw / 1e9 - max(read, copy)) < 0.06  # the description rounds to 0.1 GB/s
