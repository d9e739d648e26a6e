"""ExpertCache: byte bound, LRU / LFU / activation-aware eviction order, pinning, statistics, prefetch waits."""

from __future__ import annotations

import threading

import pytest
import torch

from moekit.offload.cache import ExpertCache, ExpertWeights
from moekit.offload.policies import LFU, LRU, ActivationAware


def _loader(nbytes=10, log=None, gate=None):
    def load(key):
        if gate is not None:
            gate.wait()
        if log is not None:
            log.append(key)
        return ExpertWeights({"w": torch.full((nbytes // 4,), float(key[1]))}, nbytes), nbytes
    return load


def test_lru_evicts_least_recent_and_bounds_bytes():
    c = ExpertCache(30, _loader(), "lru")
    for e in [0, 1, 2, 0, 3]:  # 3 evicts 1 (0 was touched after 1)
        c.get((0, e))
    assert set(c.items) == {(0, 0), (0, 2), (0, 3)} and c.used_bytes == 30
    s = c.stats
    assert (s.hits, s.misses, s.evictions, s.bytes_read, s.peak_bytes) == (1, 4, 1, 40, 30)
    assert s.hit_rate == pytest.approx(0.2)


def test_lfu_keeps_frequent():
    c = ExpertCache(20, _loader(), "lfu")
    for e in [0, 0, 0, 1, 2]:  # 2 evicts 1 (count 1 < 3)
        c.get((0, e))
    assert set(c.items) == {(0, 0), (0, 2)}


def test_lfu_counts_survive_eviction():
    p = LFU()
    for k in [(0, 1)] * 5:
        p.touch(k)
    p.touch((0, 2))
    assert p.victim([(0, 1), (0, 2)]) == (0, 2)


def test_activation_aware_prefers_recently_active_and_next_layers():
    p = ActivationAware(decay=0.5, num_layers=4)
    for _ in range(3):
        p.touch((1, 0))
    p.touch((1, 1))
    assert p.victim([(1, 0), (1, 1)]) == (1, 1)
    # equal history: the layer just computed (1) is less urgent than the next one (2)
    q = ActivationAware(decay=1.0, num_layers=4)
    q.touch((2, 0)); q.touch((1, 0))
    assert q.victim([(1, 0), (2, 0)]) == (1, 0)
    with pytest.raises(ValueError, match="decay=0"):
        ActivationAware(decay=0)


def test_lru_policy_object():
    p = LRU()
    p.insert((0, 0)); p.insert((0, 1)); p.touch((0, 0))
    assert p.victim([(0, 0), (0, 1)]) == (0, 1)


def test_pinned_never_evicted_and_bypass():
    c = ExpertCache(20, _loader(), "lru")
    c.pin([(0, 0), (0, 1)])
    w = c.get((0, 2))  # no room next to pins: used uncached
    assert float(w.tensors["w"][0]) == 2.0 and set(c.items) == {(0, 0), (0, 1)} and c.stats.bypass == 1


def test_prefetch_in_flight_is_waited_for_not_reread():
    gate, log = threading.Event(), []
    c = ExpertCache(100, _loader(log=log, gate=gate), "lru")
    t = threading.Thread(target=c.prefetch, args=((0, 4),))
    t.start()
    while (0, 4) not in c._inflight:
        pass
    res = {}
    u = threading.Thread(target=lambda: res.setdefault("w", c.get((0, 4))))
    u.start()
    gate.set()
    t.join(); u.join()
    assert log == [(0, 4)] and c.stats.prefetch_loads == 1 and c.stats.hits == 1 and c.stats.misses == 0
    assert c.stats.prefetch_waits == 1


def test_loader_error_propagates_and_clears_inflight():
    def bad(key):
        raise OSError("disk gone")
    c = ExpertCache(100, bad)
    with pytest.raises(OSError, match="disk gone"):
        c.get((0, 0))
    assert not c._inflight
