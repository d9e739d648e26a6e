"""AdaMoE null experts (Zeng et al. 2024, "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts
Language Models", Findings of EMNLP 2024, arXiv:2406.13233).

M null experts (output 0, no computation) get their own gate W_null in R^{D x M}. The router takes a softmax over
the N + M concatenated logits and a top-k with a larger k than the base model; a token that picks null experts uses
fewer true experts, so the number of FFN experts per token adapts (0 to k). The weights of the selected *true*
experts are renormalised among themselves; null experts contribute nothing. The load-balancing loss runs over all
N + M experts (``SwitchLoss`` on the layer does exactly that, since the Assignment spans them).

Null experts are :class:`moekit.experts.zero_compute.ZeroComputeExperts` zero experts: their pairs are dropped before
dispatch, so they cost nothing.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..assignment import Assignment
from ..numerics import renormalize
from ..experts.zero_compute import ZeroComputeExperts
from ..spec import register_spec
from ._gate import linear_logits
from ..protocols import RouteContext
from .base import Router, RouterSpec


@register_spec("adamoe", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaMoE(RouterSpec):
    """Top-k over N true plus M null experts (Zeng et al. 2024).

    Args:
        k: choices per token among the N + M experts (larger than the base top-k, e.g. 4 instead of 2).
        num_null: M, the null experts. At most (k - 1) * N: with more, a token routed uniformly would expect fewer
            than one true expert (k N / (N + M) < 1) and the layer would mostly compute nothing.
        router_bias: biases on the true and null gates.
        fp32: route in float32 when the input is half precision.
    """

    k: int = 4
    num_null: int = 4
    router_bias: bool = False
    fp32: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"AdaMoE: k must be >= 1, got {self.k}")
        if self.num_null < 1:
            raise ValueError(f"AdaMoE: num_null must be >= 1 (use TopK for no null experts), got {self.num_null}")

    def validate(self, num_experts: int) -> None:
        if self.k > num_experts + self.num_null:
            raise ValueError(f"AdaMoE: k={self.k} exceeds the {num_experts} true + {self.num_null} null experts")
        if self.num_null > (self.k - 1) * num_experts:
            raise ValueError(
                f"AdaMoE: too many null experts: num_null={self.num_null} with k={self.k} and {num_experts} true "
                f"experts; at most (k - 1) * num_experts = {(self.k - 1) * num_experts}, or a uniformly routed token "
                "would expect fewer than one true expert"
            )

    @property
    def num_free_experts(self) -> int:
        return self.num_null

    def build_free_experts(self, dim: int) -> ZeroComputeExperts:
        return ZeroComputeExperts(dim, zero=self.num_null)

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        return float(dim * (num_experts + self.num_null))

    def build(self, dim: int, num_experts: int) -> "AdaMoERouter":
        self.validate(num_experts)
        return AdaMoERouter(dim, num_experts, self)


class AdaMoERouter(Router):
    def __init__(self, dim: int, num_experts: int, spec: AdaMoE) -> None:
        super().__init__()
        self.spec = spec
        self.num_true = num_experts
        self.num_experts = num_experts + spec.num_null
        self.gate = nn.Linear(dim, num_experts, bias=spec.router_bias)
        self.null_gate = nn.Linear(dim, spec.num_null, bias=spec.router_bias)

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        logits_TE = torch.cat(
            [linear_logits(self.gate, x_TD, self.spec.fp32), linear_logits(self.null_gate, x_TD, self.spec.fp32)], -1
        )
        scores_TE = logits_TE.softmax(-1)
        p_TK, idx_TK = scores_TE.topk(self.spec.k, dim=-1)
        # null experts: weight 0, renormalise the true ones. A token with non-finite scores (NaN / Inf input) keeps
        # its NaN weights on the null experts too, so its output row is NaN, as with every other router.
        finite_T1 = torch.isfinite(scores_TE).all(-1, keepdim=True)
        p_TK = p_TK.masked_fill((idx_TK >= self.num_true) & finite_T1, 0.0)
        w_TK = renormalize(p_TK)
        a = Assignment.from_topk(idx_TK, w_TK.to(x_TD.dtype), self.num_experts, scores_TE, logits_TE)
        return dataclasses.replace(a, num_free_experts=self.spec.num_null)

    def extra_repr(self) -> str:
        return f"k={self.spec.k}, true={self.num_true}, null={self.spec.num_null}"
