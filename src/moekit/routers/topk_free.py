"""Token-choice top-k over FFN experts *and* compute-free experts (LongCat-Flash's zero-computation experts).

LongCat-Flash routes every token over ``N`` FFN experts plus ``Z`` "zero-computation" experts that return their
input unchanged (MoE++'s *copy* experts, Jin et al. 2024); a token that picks one spends no FFN compute on that slot.
This is :class:`~moekit.routers.topk.TopK` (every score, bias, group and precision option) over ``N + M`` experts, of
which the last ``M = constant + copy + zero`` are moekit's compute-free experts
(:class:`moekit.experts.zero_compute.ZeroComputeExperts`, slots in the order constant, copy, zero). The layer is
built with ``MoE(dim, N, router=TopKFree(copy=Z, ...))``; the compute-free pairs never reach the expert bank.

LongCat-Flash: ``TopKFree(k, softmax, normalize=False, scale=routed_scaling_factor, correction_bias=True,
logits_dtype="float32", copy=zero_expert_num)``.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ..assignment import Assignment
from ..experts.zero_compute import ZeroComputeExperts
from ..protocols import RouteContext
from ..spec import register_spec
from .topk import TopK, TopKRouter


@register_spec("topk_free", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKFree(TopK):
    """:class:`TopK` over the layer's FFN experts plus compute-free ones (ids after the FFN experts').

    Args (besides TopK's):
        constant, copy, zero: how many compute-free experts of each kind (MoE++); LongCat-Flash's zero-computation
            experts are ``copy`` experts (identity).
    """

    constant: int = 0
    copy: int = 0
    zero: int = 0
    nonnegative_fields = ("constant", "copy", "zero")

    @property
    def num_free_experts(self) -> int:
        return self.constant + self.copy + self.zero

    def with_selection_bias(self) -> "TopKFree":
        if self.num_free_experts:
            raise ValueError("TopKFree: AuxFree balancing over compute-free experts is not supported (the layer "
                             "records the loads of the FFN experts only, the selection bias covers all of them); "
                             "use a balance loss (SwitchLoss) instead")
        return super().with_selection_bias()

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts + self.num_free_experts)

    def build_free_experts(self, dim: int) -> ZeroComputeExperts | None:
        if not self.num_free_experts:
            return None
        return ZeroComputeExperts(dim, constant=self.constant, copy=self.copy, zero=self.zero)

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        return super().flops_per_token(dim, num_experts + self.num_free_experts)

    def build(self, dim: int, num_experts: int) -> "TopKFreeRouter":
        self.validate(num_experts)
        return TopKFreeRouter(dim, num_experts, self)


class TopKFreeRouter(TopKRouter):
    """A :class:`TopKRouter` over ``num_ffn_experts + num_free_experts`` experts (``num_experts`` is the total)."""

    spec: TopKFree

    def __init__(self, dim: int, num_ffn_experts: int, spec: TopKFree) -> None:
        super().__init__(dim, num_ffn_experts + spec.num_free_experts, spec)
        self.num_ffn_experts = num_ffn_experts

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        a = super().route(x_TD, ctx)
        return dataclasses.replace(a, num_free_experts=self.spec.num_free_experts)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"{super().extra_repr()}, ffn={self.num_ffn_experts}, constant={s.constant}, copy={s.copy}, "
                f"zero={s.zero}")
