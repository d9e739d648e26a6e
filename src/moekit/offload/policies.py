"""Eviction policies for :class:`~moekit.offload.cache.ExpertCache`, chosen by name from ``POLICIES``.

A policy sees every access (``touch``), insertion and removal of an expert key ``(layer, expert)`` and names the
victim among the evictable keys. Policies hold only their own bookkeeping; the cache owns the tensors.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Hashable, Iterable, Protocol

Key = tuple[int, int]


class EvictionPolicy(Protocol):
    def touch(self, key: Key) -> None: ...
    def insert(self, key: Key) -> None: ...
    def remove(self, key: Key) -> None: ...
    def victim(self, candidates: Iterable[Key]) -> Key: ...


class LRU:
    """Least recently used: evict the key whose last access is oldest."""

    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key):
        self._order[key] = None
        self._order.move_to_end(key)

    insert = touch

    def remove(self, key):
        self._order.pop(key, None)

    def victim(self, candidates):
        cand = set(candidates)
        for k in self._order:
            if k in cand:
                return k
        return next(iter(cand))


class LFU:
    """Least frequently used (counts survive eviction, so a popular expert that was evicted returns with its
    history); ties broken by least recent access."""

    def __init__(self):
        self._count: dict[Key, int] = defaultdict(int)
        self._last: dict[Key, int] = {}
        self._clock = 0

    def touch(self, key):
        self._clock += 1
        self._count[key] += 1
        self._last[key] = self._clock

    insert = touch

    def remove(self, key):
        pass

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self._count[k], self._last.get(k, 0)))


class ActivationAware:
    """In the spirit of MoE-Infinity: priority = exponentially decayed activation count of the expert (its recent
    activation ratio within the layer) plus a bonus for layers the forward pass reaches next. Experts that the
    current requests keep activating stay; a layer that was just computed is the least urgent to keep, because the
    next time it is needed lies a whole forward pass away.

    ``decay``: per-access decay of the counts (1.0 = plain frequency); ``num_layers`` enables the proximity term.
    """

    def __init__(self, decay: float = 0.99, num_layers: int | None = None, proximity_weight: float = 0.5):
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay}: expected a value in (0, 1]")
        self.decay, self.num_layers, self.proximity_weight = decay, num_layers, proximity_weight
        self._score: dict[Key, float] = defaultdict(float)
        self._stamp: dict[Key, int] = {}
        self._clock = 0
        self._layer_now = 0

    def _decayed(self, key: Key) -> float:
        return self._score[key] * self.decay ** (self._clock - self._stamp.get(key, self._clock))

    def touch(self, key):
        self._score[key] = self._decayed(key) + 1.0
        self._clock += 1
        self._stamp[key] = self._clock
        self._layer_now = key[0]

    def insert(self, key):
        self._stamp.setdefault(key, self._clock)

    def remove(self, key):
        pass

    def victim(self, candidates):
        def priority(k: Key) -> float:
            p = self._decayed(k)
            if self.num_layers:
                ahead = (k[0] - self._layer_now - 1) % self.num_layers  # 0 = next layer to run
                p += self.proximity_weight * (1.0 - ahead / self.num_layers)
            return p

        return min(candidates, key=priority)


POLICIES: dict[str, type] = {"lru": LRU, "lfu": LFU, "activation": ActivationAware}


def make_policy(name: str | EvictionPolicy, **kwargs) -> EvictionPolicy:
    if not isinstance(name, str):
        return name
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"policy={name!r}: expected one of {sorted(POLICIES)} or a policy object") from None
    if cls is ActivationAware:
        return cls(**kwargs)
    return cls()


__all__ = ["ActivationAware", "EvictionPolicy", "LFU", "LRU", "POLICIES", "make_policy", "Hashable"]
