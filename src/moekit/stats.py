"""Routing statistics: tokens per expert, dropped fraction, max/mean load. Per call and accumulated."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import Tensor, nn

from .walk import moe_layers


@dataclass(frozen=True)
class RoutingStats:
    tokens_per_expert_E: Tensor  # pairs each expert computed (after dropping)
    routed_per_expert_E: Tensor  # pairs the router sent to each expert (before dropping)
    num_tokens: int
    calls: int = 1

    @property
    def num_pairs(self) -> int:
        return int(self.routed_per_expert_E.sum())

    @property
    def dropped_fraction(self) -> float:
        n = self.num_pairs
        return 0.0 if n == 0 else 1.0 - float(self.tokens_per_expert_E.sum()) / n

    @property
    def max_over_mean(self) -> float:
        """Max over mean of the routed load; 1.0 is perfect balance."""
        load = self.routed_per_expert_E.double()
        m = float(load.mean())
        return float("nan") if m == 0 else float(load.max()) / m

    @property
    def experts_per_token(self) -> float:
        return 0.0 if self.num_tokens == 0 else float(self.tokens_per_expert_E.sum()) / self.num_tokens

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        return RoutingStats(
            self.tokens_per_expert_E + other.tokens_per_expert_E,
            self.routed_per_expert_E + other.routed_per_expert_E,
            self.num_tokens + other.num_tokens,
            self.calls + other.calls,
        )

    def as_dict(self) -> dict:
        return {
            "tokens_per_expert": self.tokens_per_expert_E.tolist(),
            "routed_per_expert": self.routed_per_expert_E.tolist(),
            "num_tokens": self.num_tokens,
            "calls": self.calls,
            "dropped_fraction": self.dropped_fraction,
            "max_over_mean": self.max_over_mean,
            "experts_per_token": self.experts_per_token,
        }


_moe_layers = moe_layers  # the older private name, still imported by moekit.parallel and moekit.convert


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """Accumulated statistics of every MoE layer in ``model`` whose tracking is on (see :func:`track_routing`)."""
    return {name: m.stats_total for name, m in _moe_layers(model) if m.stats_total is not None}


def reset_routing_stats(model: nn.Module) -> None:
    for _, m in _moe_layers(model):
        m.stats_total = None


@contextmanager
def track_routing(model: nn.Module, reset: bool = True) -> Iterator[dict[str, RoutingStats]]:
    """Accumulate routing statistics of every MoE layer inside the block; the yielded dict is filled on exit.

    >>> with track_routing(model) as stats:  # doctest: +SKIP
    ...     model(x)
    >>> stats["layers.0.mlp"].max_over_mean  # doctest: +SKIP
    """
    layers = list(_moe_layers(model))
    previous = {name: m.accumulate_stats for name, m in layers}
    if reset:
        reset_routing_stats(model)
    for _, m in layers:
        m.accumulate_stats = True
    out: dict[str, RoutingStats] = {}
    try:
        yield out
    finally:
        for name, m in layers:
            m.accumulate_stats = previous[name]
        out.update(routing_stats(model))


