"""The state one offloaded model shares across its experts modules: checkpoint sources, cache, compression, prefetch
and routing statistics. :func:`moekit.offload.load_offloaded` builds it; :class:`OffloadedExperts` uses it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .cache import ExpertCache, ExpertWeights, tensors_nbytes
from .layout import ExpertSource
from .quant import QuantizedTensor, maybe_dequantize, quantize


@dataclass
class QuantConfig:
    """Lossy expert compression. ``bits``: "int8" / "int4" for every cached expert (None = exact), or per-expert
    precision from ``expert_bits[(layer, e)]`` (EdgeMoE). ``lowbit_on_miss``: keep an int4 copy of every expert in
    memory and compute a cache miss with it instead of waiting for the disk (HOBBIT)."""

    bits: str | None = None
    group_size: int = 64
    expert_bits: dict[tuple[int, int], str | None] = field(default_factory=dict)
    lowbit_on_miss: bool = False
    lowbit_bits: str = "int4"

    @property
    def lossless(self) -> bool:
        return self.bits is None and not self.expert_bits and not self.lowbit_on_miss


class OffloadRuntime:
    def __init__(self, sources: dict[int, ExpertSource], dtype: torch.dtype, budget_bytes: int,
                 policy="lru", policy_kwargs=None, quant: QuantConfig | None = None,
                 working_bytes: int | None = None):
        self.sources, self.dtype = sources, dtype
        self._expert_bytes: dict[int, int] = {}
        self.quant = quant or QuantConfig()
        self._exact = self.quant.lossless  # cached tensors are already the compute dtype: used as they are
        self.cache = ExpertCache(budget_bytes, self._load, policy, policy_kwargs or {})
        self.prefetcher = None
        self.working_bytes = working_bytes or max(budget_bytes // 20, 1)
        self._counts: dict[int, list[int]] = {}          # layer -> [E] routed slots (calibration profile)
        self.lowbit: dict[tuple[int, int], dict[str, QuantizedTensor]] = {}
        self.lowbit_served = 0
        self.calls = defaultdict(int)

    # --- sizes -------------------------------------------------------------------------------------------------
    def expert_bytes(self, layer: int) -> int:
        """Bytes of one uncompressed expert of ``layer`` in the compute dtype."""
        if layer in self._expert_bytes:
            return self._expert_bytes[layer]
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        b = sum(int(torch.Size(s).numel()) * itemsize for s in self.sources[layer].params.values())
        self._expert_bytes[layer] = b
        return b

    def total_expert_bytes(self) -> int:
        return sum(self.expert_bytes(L) * s.num_experts for L, s in self.sources.items())

    # --- loading -----------------------------------------------------------------------------------------------
    def _bits(self, key) -> str | None:
        return self.quant.expert_bits.get(key, self.quant.bits)

    def _load(self, key) -> tuple[ExpertWeights, int]:
        layer, e = key
        tensors, nread = self.sources[layer].read(e, self.dtype)
        bits = self._bits(key)
        if bits is not None:
            tensors = {p: quantize(t, bits, self.quant.group_size) if t.dim() >= 2 else t for p, t in tensors.items()}
        return ExpertWeights(tensors, tensors_nbytes(tensors)), nread

    def build_lowbit(self) -> None:
        """HOBBIT's low-precision copies of every expert (read once, here, before generation)."""
        for layer, src in self.sources.items():
            for e in range(src.num_experts):
                tensors, _ = src.read(e, self.dtype)
                self.lowbit[(layer, e)] = {p: quantize(t, self.quant.lowbit_bits, self.quant.group_size)
                                           if t.dim() >= 2 else t for p, t in tensors.items()}

    def lowbit_bytes(self) -> int:
        return sum(tensors_nbytes(t) for t in self.lowbit.values())

    def expert(self, layer: int, e: int) -> dict[str, object]:
        """Expert weights as stored (maybe quantised), through the cache (or the low-bit copy on a miss)."""
        key = (layer, e)
        if self.quant.lowbit_on_miss and self.lowbit:
            w = self.cache.peek(key)
            if w is None:
                self.lowbit_served += 1
                self.cache.stats.misses += 1
                if self.prefetcher is not None:  # bring the full-precision copy in for next time
                    self.prefetcher._pool.submit(self.cache.prefetch, key)
                return self.lowbit[key]
            return w.tensors
        return self.cache.get(key).tensors

    def expert_tensors(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """Expert weights ready to compute with (dequantised if stored quantised); a cache hit of an exact expert
        returns the cached tensors themselves."""
        if self._exact:
            return self.cache.get((layer, e)).tensors
        return dequantized(self.expert(layer, e), self.dtype)

    @property
    def counts(self) -> dict[int, torch.Tensor]:
        """layer -> routed slots per expert ``[E]`` since loading (the calibration profile)."""
        return {L: torch.tensor(c, dtype=torch.long) for L, c in self._counts.items()}

    def observe(self, layer: int, idx: torch.Tensor, ids: list[int], flat: list[int] | None = None) -> None:
        """Record one call's routing (``flat``: the indices as a Python list when the caller has it)."""
        c = self._counts.get(layer)
        if c is None:
            c = self._counts[layer] = [0] * self.sources[layer].num_experts
        if flat is not None:
            for e in flat:
                c[e] += 1
        else:
            for e, n in enumerate(torch.bincount(idx.flatten(), minlength=len(c))[: len(c)].tolist()):
                c[e] += n
        self.calls[layer] += 1
        if self.prefetcher is not None:
            self.prefetcher.observe(layer, ids)

    def hot_experts(self, fraction_of_budget: float = 0.5) -> list[tuple[int, int]]:
        """The most routed experts of the recorded profile, as many as fill ``fraction_of_budget`` of the budget."""
        scored = [((L, e), int(c)) for L, cs in self._counts.items() for e, c in enumerate(cs) if c > 0]
        scored.sort(key=lambda t: -t[1])
        out, used = [], 0
        for key, _ in scored:
            b = self.expert_bytes(key[0])
            if used + b > fraction_of_budget * self.cache.budget_bytes:
                break
            out.append(key)
            used += b
        return out


def dequantized(tensors: dict[str, object], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {p: t if isinstance(t, torch.Tensor) and t.dtype == dtype else maybe_dequantize(t, dtype)
            for p, t in tensors.items()}
