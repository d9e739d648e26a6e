"""Local dispatch: group the (token, expert) pairs by expert with one stable sort (Edge-MoE's "patch
reordering"), optionally dropping pairs beyond an expert capacity, then scatter-add the weighted outputs back.

The plan (:class:`moekit.dispatch.plan.DispatchPlan`) is the same type the expert-parallel dispatcher returns.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..assignment import Assignment
from ..experts.bank import DECODE_MAX_ROWS
from ..numerics import as_dtype
from ..ops.permute import combine_grid, gather_replicated, permute_rows
from ..spec import Spec, register_spec
from .plan import DispatchPlan

_DROP_POLICIES = ("position", "score")
_WEIGHT_AT = ("output", "input")


def _check_weight_at(owner: str, weight_at: str) -> None:
    if weight_at not in _WEIGHT_AT:
        raise ValueError(f"{owner}: weight_at must be one of {', '.join(map(repr, _WEIGHT_AT))}, got {weight_at!r}")


def expert_counts(expert_N: Tensor, num_experts: int) -> Tensor:
    """Pairs per expert (long, (E,)). ``bincount`` in eager; a scatter-add under compile / export / meta, where
    ``bincount`` has no meta kernel (its output size depends on the data)."""
    if torch.compiler.is_compiling() or expert_N.device.type == "meta":
        ones = torch.ones_like(expert_N)
        return torch.zeros(num_experts, dtype=expert_N.dtype, device=expert_N.device).scatter_add(0, expert_N, ones)
    return torch.bincount(expert_N, minlength=num_experts)


class LocalDispatcher(nn.Module):
    """Sort-based grouping on one process; subclasses decide which pairs to keep (:meth:`keep_mask`).

    ``plan(a, group_size) -> DispatchPlan``; ``dispatch(x_TD, plan) -> (x_ND, handle)``; ``combine(y_ND, plan,
    handle) -> y_TD``. The handle is None: nothing has to be carried from dispatch to combine on one process.

    ``weight_at`` says where a pair's router weight applies: ``"output"`` (y_t = sum_e w_te f_e(x_t), every MoE
    paper) or ``"input"`` (y_t = sum_e f_e(w_te x_t), Llama 4): ``dispatch`` then scales each gathered row by its
    weight and ``combine`` sums the expert outputs unweighted. An expert-parallel dispatcher wrapping this one
    inherits the rule, since it gathers and combines through it. ``spec`` is the dispatch spec it was built from."""

    def __init__(self, spec: "Dropless | Capacity | None" = None) -> None:
        super().__init__()
        self.spec = spec if spec is not None else Dropless()

    @property
    def weight_at(self) -> str:
        return self.spec.weight_at

    def keep_mask(self, a: Assignment, group_size: int | None) -> Tensor | None:
        return None  # dropless: keep every pair

    def plan(self, a: Assignment, group_size: int | None = None) -> DispatchPlan:
        routed_E = expert_counts(a.expert_N, a.num_experts)
        keep = self.keep_mask(a, group_size)
        if keep is None and a.num_slots is not None and not _few_pairs_no_grad(a):
            return _grid_plan(a, routed_E)
        return _sorted_plan(a, routed_E, keep)

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> tuple[Tensor, None]:
        if plan.inv_order_N is not None:
            x_ND = gather_replicated(x_TD, plan.token_N, plan.inv_order_N, plan.num_slots)
        else:
            x_ND = x_TD.index_select(0, plan.token_N)
        if self.weight_at == "input":
            x_ND = x_ND * sorted_weights(plan).unsqueeze(-1).to(x_ND.dtype)
        return x_ND, None

    def combine(self, y_ND: Tensor, plan: DispatchPlan, handle: None) -> Tensor:
        """Weighted sum of each token's expert outputs. Half-precision outputs are weighted and summed in float32
        and rounded once (as Hugging Face's MoE blocks do)."""
        dtype = y_ND.dtype
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        # the weights, or None where they were applied to the inputs in dispatch
        w_N = as_dtype(plan.weight_N, acc) if self.weight_at == "output" else None
        if plan.inv_order_N is not None:
            # weight_N is in grid order here: (K, T) after the pairs are put back in grid order
            out_TD = combine_grid(y_ND, w_N, plan.order_N, plan.inv_order_N, plan.num_slots, plan.num_tokens)
            if out_TD is not None:  # one native pass (CPU float32 / bfloat16)
                return out_TD
            D = y_ND.shape[-1]  # explicit, so that an empty batch (T = 0) reshapes too
            y_KTD = permute_rows(y_ND, plan.inv_order_N, plan.order_N).view(plan.num_slots, plan.num_tokens, D)
            y_KTD = as_dtype(y_KTD, acc)
            if w_N is not None:
                y_KTD = y_KTD * w_N.view(plan.num_slots, plan.num_tokens, 1)
            return as_dtype(y_KTD.sum(0), dtype)
        y_ND = as_dtype(y_ND, acc)
        if plan.num_tokens == 1 and y_ND.shape[0] > 0:  # one token: the weighted sum of its rows is one product
            y_1D = y_ND.sum(0, keepdim=True) if w_N is None else torch.mm(w_N.unsqueeze(0), y_ND)
            return as_dtype(y_1D, dtype)
        if w_N is not None:
            y_ND = y_ND * w_N.unsqueeze(-1)
        out_TD = y_ND.new_zeros(plan.num_tokens, y_ND.shape[-1])
        return as_dtype(out_TD.index_add(0, plan.token_N, y_ND), dtype)

    def extra_repr(self) -> str:
        return "" if self.weight_at == "output" else "weight_at=input"


def sorted_weights(plan: DispatchPlan) -> Tensor:
    """The router weight of each row the bank receives from this process (the plan's pairs in expert order)."""
    return plan.weight_N if plan.order_N is None else plan.weight_N.index_select(0, plan.order_N)


def _few_pairs_no_grad(a: Assignment) -> bool:
    """Decode (no autograd, at most ``DECODE_MAX_ROWS`` pairs): the grid plan's inverse permutation only pays off in
    the backward pass, so the plain sorted plan (fewer small ops before and after the experts) is used."""
    return (not torch.is_grad_enabled() and a.num_pairs <= DECODE_MAX_ROWS
            and not torch.compiler.is_compiling())


def _sorted_plan(a: Assignment, routed_E: Tensor, keep_N: Tensor | None) -> DispatchPlan:
    """The kept pairs (all when ``keep_N`` is None) sorted by expert, stable."""
    token_N, expert_N, weight_N = a.token_N, a.expert_N, a.weight_N
    if keep_N is not None:
        token_N, expert_N, weight_N = token_N[keep_N], expert_N[keep_N], weight_N[keep_N]
        kept_E = expert_counts(expert_N, a.num_experts)
    else:
        kept_E = routed_E
    if a.num_tokens == 1 and keep_N is None:  # one token (decode): its token ids are all 0, so only two ops
        expert_N, order = expert_N.sort(stable=True)
        return DispatchPlan(token_N=token_N, weight_N=weight_N[order], num_tokens=1, counts_E=kept_E,
                            expert_N=expert_N, routed_E=routed_E, kept_E=kept_E)
    order = torch.argsort(expert_N, stable=True)
    return DispatchPlan(token_N=token_N[order], weight_N=weight_N[order], num_tokens=a.num_tokens,
                        counts_E=kept_E, expert_N=expert_N[order], routed_E=routed_E, kept_E=kept_E)


def _grid_plan(a: Assignment, routed_E: Tensor) -> DispatchPlan:
    """Every pair of a top-k grid kept: the sort permutation and its inverse let gathers with inverse-permutation
    backwards replace both scatters; ``weight_N`` stays in grid order."""
    order = torch.argsort(a.expert_N, stable=True)
    inv_order = torch.empty_like(order)
    inv_order[order] = torch.arange(order.numel(), device=order.device)
    return DispatchPlan(token_N=a.token_N[order], weight_N=a.weight_N, num_tokens=a.num_tokens, counts_E=routed_E,
                        expert_N=a.expert_N[order], routed_E=routed_E, kept_E=routed_E, order_N=order,
                        inv_order_N=inv_order, num_slots=a.num_slots)


@register_spec("dropless", "dispatch")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Dropless(Spec):
    """Every (token, expert) pair is computed; experts get uneven loads.

    Args:
        weight_at: ``"output"`` (default): a token's output is the router-weighted sum of its experts' outputs;
            ``"input"``: each expert sees the token scaled by its router weight and the outputs are summed
            unweighted (Llama 4's MoE).
    """

    weight_at: str = "output"

    def __post_init__(self) -> None:
        _check_weight_at("Dropless", self.weight_at)

    def build(self, num_experts: int) -> LocalDispatcher:
        return LocalDispatcher(self)


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
        weight_at: where the router weight applies, ``"output"`` or ``"input"`` (see :class:`Dropless`).
    """

    factor: float | None = 1.25
    capacity: int | None = None
    per_sequence: bool = False
    drop: str = "position"
    weight_at: str = "output"

    def __post_init__(self) -> None:
        if self.capacity is not None:
            if self.capacity < 1:
                raise ValueError(f"Capacity: capacity must be a positive integer, got {self.capacity}")
        elif self.factor is None or not self.factor > 0:
            raise ValueError(f"Capacity: capacity factor must be > 0, got {self.factor}")
        if self.drop not in _DROP_POLICIES:
            raise ValueError(f"Capacity: unknown drop policy {self.drop!r}; valid choices: {', '.join(_DROP_POLICIES)}")
        _check_weight_at("Capacity", self.weight_at)

    def build(self, num_experts: int) -> "CapacityDispatcher":
        return CapacityDispatcher(self)


class CapacityDispatcher(LocalDispatcher):
    def __init__(self, spec: Capacity) -> None:
        super().__init__(spec)

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
