"""A byte-bounded cache of expert weights with pluggable eviction, pinning and statistics.

Keys are ``(layer, expert)``; values are :class:`ExpertWeights` (a dict of tensors and their byte size). The cache
is thread-safe so a prefetch thread can fill it while the main thread computes: a key being loaded is "in flight",
and a lookup of it waits for that load instead of reading the bytes a second time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .policies import EvictionPolicy, Key, make_policy


@dataclass
class ExpertWeights:
    """One expert's tensors, keyed by the experts module's parameter name (``gate_up_proj``...), as stored in the
    cache (possibly quantised: then values are :class:`~moekit.offload.quant.QuantizedTensor`)."""

    tensors: dict[str, object]
    nbytes: int


def tensors_nbytes(tensors: dict[str, object]) -> int:
    return sum(t.nbytes if isinstance(t, torch.Tensor) else t.nbytes for t in tensors.values())


@dataclass
class CacheStats:
    """Counters since construction (or the last :meth:`ExpertCache.reset_stats`)."""

    hits: int = 0            # lookups served from memory (includes waits on a prefetch in flight)
    misses: int = 0          # lookups that read the expert from disk on the compute path
    bytes_read: int = 0      # bytes read from disk for experts (misses and prefetches)
    evictions: int = 0
    prefetch_loads: int = 0  # experts read by the prefetch thread
    prefetch_waits: int = 0  # hits that had to wait for an in-flight prefetch
    bypass: int = 0          # loaded experts that did not fit next to pinned ones and were used uncached
    peak_bytes: int = 0      # largest number of bytes the cache held at once

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict[str, float]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["hit_rate"] = self.hit_rate
        return d


@dataclass
class ExpertCache:
    """Holds at most ``budget_bytes`` of expert weights; ``loader(key)`` reads one expert (and reports its bytes).

    ``policy`` is a name from :data:`~moekit.offload.policies.POLICIES` or a policy object. Pinned keys are never
    evicted (and count against the budget).
    """

    budget_bytes: int
    loader: Callable[[Key], tuple[ExpertWeights, int]]
    policy: str | EvictionPolicy = "lru"
    policy_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes={self.budget_bytes}: expected a positive byte count")
        self.policy = make_policy(self.policy, **self.policy_kwargs)
        self.items: dict[Key, ExpertWeights] = {}
        self.pinned: set[Key] = set()
        self.used_bytes = 0
        self.stats = CacheStats()
        self._inflight: dict[Key, threading.Event] = {}
        self._lock = threading.RLock()

    # --- lookups -----------------------------------------------------------------------------------------------
    def get(self, key: Key) -> ExpertWeights:
        """The expert's weights: from memory (hit), from an in-flight prefetch (hit, waits) or from disk (miss)."""
        while True:
            with self._lock:
                if key in self.items:
                    self.stats.hits += 1
                    self.policy.touch(key)
                    return self.items[key]
                ev = self._inflight.get(key)
                if ev is None:
                    self._inflight[key] = threading.Event()
                    self.stats.misses += 1
                    break
            ev.wait()
            with self._lock:
                if key in self.items:
                    self.stats.prefetch_waits += 1
        return self._load(key, touch=True)

    def contains(self, key: Key) -> bool:
        with self._lock:
            return key in self.items

    def peek(self, key: Key) -> ExpertWeights | None:
        """The weights if cached (counted as a hit), else None without loading (used by lossy miss handling)."""
        with self._lock:
            w = self.items.get(key)
            if w is not None:
                self.stats.hits += 1
                self.policy.touch(key)
            return w

    def prefetch(self, key: Key) -> bool:
        """Load ``key`` into the cache unless it is cached or in flight (called from the prefetch thread).
        Returns whether bytes were read."""
        with self._lock:
            if key in self.items or key in self._inflight:
                return False
            self._inflight[key] = threading.Event()
            self.stats.prefetch_loads += 1
        self._load(key, touch=False)
        return True

    def pin(self, keys: Iterable[Key]) -> None:
        """Load and pin ``keys`` (e.g. the hottest experts of a calibration profile); they are never evicted."""
        keys = list(keys)
        for k in keys:
            with self._lock:
                self.pinned.add(k)
            if not self.contains(k):
                self.prefetch(k)
        with self._lock:
            left_out = [k for k in keys if k not in self.items]
            if left_out:
                pinned_bytes = sum(self.items[k].nbytes for k in self.pinned if k in self.items)
                raise ValueError(f"pinned experts need more than the budget ({self.budget_bytes} bytes): "
                                 f"{len(keys) - len(left_out)} fit ({pinned_bytes} bytes), {left_out[:4]}... do not; "
                                 f"pin fewer experts")

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = CacheStats()

    # --- internals ---------------------------------------------------------------------------------------------
    def _load(self, key: Key, touch: bool) -> ExpertWeights:
        try:
            weights, nread = self.loader(key)
        except BaseException:
            with self._lock:
                self._inflight.pop(key).set()
            raise
        with self._lock:
            self.stats.bytes_read += nread
            self._insert(key, weights, touch)
            self._inflight.pop(key).set()
        return weights

    def _insert(self, key: Key, weights: ExpertWeights, touch: bool) -> None:
        if key in self.items:
            return
        while self.used_bytes + weights.nbytes > self.budget_bytes:
            candidates = [k for k in self.items if k not in self.pinned]
            if not candidates:
                self.stats.bypass += 1
                return
            victim = self.policy.victim(candidates)
            self.used_bytes -= self.items.pop(victim).nbytes
            self.policy.remove(victim)
            self.stats.evictions += 1
        self.items[key] = weights
        self.used_bytes += weights.nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used_bytes)
        self.policy.insert(key)
        if touch:
            self.policy.touch(key)
