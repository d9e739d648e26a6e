"""Local dispatch: group the (token, expert) pairs by expert with one stable sort (Edge-MoE's "patch
reordering"), optionally dropping pairs beyond an expert capacity, then scatter-add the weighted outputs back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..assignment import Assignment
from ..ops.permute import gather_replicated, permute_rows
from ..spec import Spec, register_spec

_DROP_POLICIES = ("position", "score")


def expert_counts(expert_N: Tensor, num_experts: int) -> Tensor:
    """Pairs per expert (long, (E,)). ``bincount`` in eager; a scatter-add under compile / export / meta, where
    ``bincount`` has no meta kernel (its output size depends on the data)."""
    if torch.compiler.is_compiling() or expert_N.device.type == "meta":
        ones = torch.ones_like(expert_N)
        return torch.zeros(num_experts, dtype=expert_N.dtype, device=expert_N.device).scatter_add(0, expert_N, ones)
    return torch.bincount(expert_N, minlength=num_experts)


@dataclass(frozen=True)
class DispatchPlan:
    """Kept pairs sorted by expert; what ``dispatch`` gathers and ``combine`` scatters."""

    token_N: Tensor
    expert_N: Tensor
    weight_N: Tensor
    counts_E: Tensor  # kept pairs per expert
    routed_E: Tensor  # pairs per expert before dropping
    num_tokens: int
    # Grid fast path (dropless top-k): the sort permutation of the grid pairs (j*T + t), its inverse, and K.
    # In this mode ``weight_N`` stays in grid order.
    order_N: Tensor | None = None
    inv_order_N: Tensor | None = None
    num_slots: int | None = None

    @property
    def kept_E(self) -> Tensor:
        """Kept pairs per expert, for routing statistics (the expert-parallel plan reports global experts here)."""
        return self.counts_E

    @property
    def num_dropped(self) -> Tensor:
        return self.routed_E.sum() - self.counts_E.sum()


class LocalDispatcher(nn.Module):
    """Sort-based grouping on one process; subclasses decide which pairs to keep."""

    def keep_mask(self, a: Assignment, group_size: int | None) -> Tensor | None:
        return None  # dropless: keep every pair

    def plan(self, a: Assignment, group_size: int | None = None) -> DispatchPlan:
        routed_E = expert_counts(a.expert_N, a.num_experts)
        keep = self.keep_mask(a, group_size)
        token_N, expert_N, weight_N = a.token_N, a.expert_N, a.weight_N
        if keep is not None:
            token_N, expert_N, weight_N = token_N[keep], expert_N[keep], weight_N[keep]
            counts_E = expert_counts(expert_N, a.num_experts)
        else:
            counts_E = routed_E
        order = torch.argsort(expert_N, stable=True)
        if keep is None and a.num_slots is not None:
            # Every grid pair is kept: gathers with inverse-permutation backwards replace both scatters.
            inv_order = torch.empty_like(order)
            inv_order[order] = torch.arange(order.numel(), device=order.device)
            return DispatchPlan(
                token_N[order], expert_N[order], weight_N, counts_E, routed_E, a.num_tokens, order, inv_order, a.num_slots
            )
        return DispatchPlan(token_N[order], expert_N[order], weight_N[order], counts_E, routed_E, a.num_tokens)

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        if plan.inv_order_N is not None:
            return gather_replicated(x_TD, plan.token_N, plan.inv_order_N, plan.num_slots)
        return x_TD.index_select(0, plan.token_N)

    def combine(self, y_ND: Tensor, plan: DispatchPlan) -> Tensor:
        """Weighted sum of each token's expert outputs. Half-precision outputs are weighted and summed in float32
        and rounded once (as Hugging Face's MoE blocks do)."""
        dtype = y_ND.dtype
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        if plan.inv_order_N is not None:
            # weight_N is in grid order here: (K, T) after the pairs are put back in grid order
            D = y_ND.shape[-1]  # explicit, so that an empty batch (T = 0) reshapes too
            y_KTD = permute_rows(y_ND, plan.inv_order_N, plan.order_N).view(plan.num_slots, plan.num_tokens, D)
            w_KT1 = plan.weight_N.to(acc).view(plan.num_slots, plan.num_tokens, 1)
            return (y_KTD.to(acc) * w_KT1).sum(0).to(dtype)
        y_ND = y_ND.to(acc) * plan.weight_N.unsqueeze(-1).to(acc)
        out_TD = y_ND.new_zeros(plan.num_tokens, y_ND.shape[-1])
        return out_TD.index_add(0, plan.token_N, y_ND).to(dtype)


@register_spec("dropless", "dispatch")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Dropless(Spec):
    """Every (token, expert) pair is computed; experts get uneven loads."""

    def build(self, num_experts: int) -> LocalDispatcher:
        return LocalDispatcher()


@register_spec("capacity", "dispatch")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Capacity(Spec):
    """Each expert takes at most C pairs per group; the rest are dropped and contribute zero (the caller's
    residual carries those tokens).

    Args:
        factor: C = ceil(factor * pairs_in_group / num_experts) (GShard / Switch capacity factor).
        capacity: an absolute C instead of ``factor`` (HF SwitchTransformers ``expert_capacity``).
        per_sequence: apply the capacity per sequence (rows of a (B, S, D) input) instead of over all tokens.
        drop: which pairs lose when an expert is full. ``"position"``: pairs keep the router's priority order
            (all first choices before all second choices, then token position; GShard/Switch). ``"score"``: the
            pairs with the highest combine weight win (batch-prioritised routing, Riquelme et al. 2021).
    """

    factor: float | None = 1.25
    capacity: int | None = None
    per_sequence: bool = False
    drop: str = "position"

    def __post_init__(self) -> None:
        if self.capacity is not None:
            if self.capacity < 1:
                raise ValueError(f"Capacity: capacity must be a positive integer, got {self.capacity}")
        elif self.factor is None or not self.factor > 0:
            raise ValueError(f"Capacity: capacity factor must be > 0, got {self.factor}")
        if self.drop not in _DROP_POLICIES:
            raise ValueError(f"Capacity: unknown drop policy {self.drop!r}; valid choices: {', '.join(_DROP_POLICIES)}")

    def build(self, num_experts: int) -> "CapacityDispatcher":
        return CapacityDispatcher(self)


class CapacityDispatcher(LocalDispatcher):
    def __init__(self, spec: Capacity) -> None:
        super().__init__()
        self.spec = spec

    def capacity_for(self, pairs_per_group: int, num_experts: int) -> int:
        if self.spec.capacity is not None:
            return self.spec.capacity
        if math.isinf(self.spec.factor):
            return pairs_per_group
        return max(1, math.ceil(self.spec.factor * pairs_per_group / num_experts))

    def keep_mask(self, a: Assignment, group_size: int | None) -> Tensor:
        E, N = a.num_experts, a.num_pairs
        if self.spec.per_sequence and group_size:
            group_N = torch.div(a.token_N, group_size, rounding_mode="floor")
            num_groups = max(1, a.num_tokens // group_size)
        else:
            group_N = torch.zeros_like(a.token_N)
            num_groups = 1
        C = self.capacity_for(N // num_groups, E)
        key_N = group_N * E + a.expert_N
        if self.spec.drop == "score":
            prio = torch.argsort(a.weight_N.detach(), descending=True, stable=True)
        else:
            prio = torch.arange(N, device=key_N.device)
        order = prio[torch.argsort(key_N[prio], stable=True)]
        key_sorted = key_N[order]
        counts_K = torch.bincount(key_sorted, minlength=num_groups * E)
        starts_K = torch.cumsum(counts_K, 0) - counts_K
        rank_sorted = torch.arange(N, device=key_N.device) - starts_K[key_sorted]
        keep = torch.empty(N, dtype=torch.bool, device=key_N.device)
        keep[order] = rank_sorted < C
        return keep
