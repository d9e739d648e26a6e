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
    assert timing.read_bandwidth(2**22, repeats=2, hugepages=True) > 0  # on huge pages where the kernel has them
    assert timing.copy_bandwidth(2**22, repeats=2, hugepages=True) > 0
    bw, name = memory_bandwidth()
    read, copy = (float(part.split()[-1]) for part in name.split(":")[1].split(","))
    assert abs(bw / 1e9 - max(read, copy)) < 0.06  # the description rounds to 0.1 GB/s


def test_summary_names_the_best_hf_block_and_the_memory_floor():
    from moekit.bench.layer_bench import summary

    def row(shape, impl, ratio, ms):
        return {"shape": shape, "dtype": "float32", "threads": 2, "mode": "fwd", "impl": impl, "ratio": ratio,
                "ratio_iqr": [ratio - 0.01, ratio + 0.01], "median_ms": ms}

    rows = [row("train", "dense-floor", 1.0, 10.0), row("train", "moekit", 1.05, 10.5),
            row("train", "hf-mixtral-eager", 1.30, 13.0), row("train", "hf-qwen3moe-grouped_mm", 1.20, 12.0),
            row("decode", "moekit", 2.0, 4.0), row("decode", "hf-mixtral-eager", 2.5, 5.0)]
    lines = summary(rows).splitlines()
    assert len(lines) == 4
    assert "**1.05 (1.04-1.06)**" in lines[2] and "1.20 (1.19-1.21) qwen3moe-grouped_mm" in lines[2]
    assert "| 10.0 |" in lines[2]
    assert "memory 2.00" in lines[3] and "mixtral-eager" in lines[3]
