"""Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models",
ACL 2024, arXiv:2403.07652) and its dynamic (entropy) loss.

p = softmax(x W_g). Sort p in descending order and keep the shortest prefix whose cumulative sum passes the
threshold p_thr (the expert that crosses it is included): expert j of the sorted order is kept iff the mass before
it is at most p_thr. The combine weight is the raw probability (not renormalised). A confident token gets one
expert, an uncertain one several; the mean number of experts per token is ``MoEOutput.stats.experts_per_token``.

The authors add a dynamic loss L_d = -sum_e p_e log p_e (mean over tokens), coefficient 1e-4, beside the usual
load-balancing loss (1e-2): minimising the router entropy stops the router from spreading mass thinly to activate
more experts. Use it as ``balance=(SwitchLoss(coef=0.01), EntropyLoss(coef=1e-4))``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..assignment import Assignment
from ..balance.losses import router_entropy  # noqa: F401  (re-exported; it lives in moekit.balance)
from ..balance.specs import EntropyLoss  # noqa: F401
from ..numerics import renormalize
from ..spec import register_spec
from ._gate import linear_logits
from ..protocols import RouteContext
from .base import Router, RouterSpec


@register_spec("top_p", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TopP(RouterSpec):
    """Dynamic top-p routing (Huang et al. 2024).

    Args:
        threshold: p_thr in (0, 1]; the authors use 0.4. 1.0 selects every expert.
        max_k: an optional cap on the experts per token (not in the paper; None = no cap).
        normalize: renormalise the kept probabilities to sum to one (the paper does not).
        router_bias: a bias on the router's linear map.
        fp32: route in float32 when the input is half precision.
    """

    threshold: float = 0.4
    max_k: int | None = None
    normalize: bool = False
    router_bias: bool = False
    fp32: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"TopP: threshold must be in (0, 1], got {self.threshold}")
        if self.max_k is not None and self.max_k < 1:
            raise ValueError(f"TopP: max_k must be >= 1, got {self.max_k}")

    def build(self, dim: int, num_experts: int) -> "TopPRouter":
        return TopPRouter(dim, num_experts, self)


def top_p_mask(sorted_p_TE: Tensor, threshold: float) -> Tensor:
    """Which sorted experts are kept: those whose preceding cumulative mass is <= threshold (all at 1.0)."""
    if threshold >= 1.0:  # rounding could push the cumulative sum past 1 before the last expert
        return torch.ones_like(sorted_p_TE, dtype=torch.bool)
    before_TE = torch.cumsum(sorted_p_TE, -1) - sorted_p_TE
    before_TE[:, 0] = 0.0
    return before_TE <= threshold


class TopPRouter(Router):
    def __init__(self, dim: int, num_experts: int, spec: TopP) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=spec.router_bias)

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        s = self.spec
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = linear_logits(self.gate, x_TD, s.fp32)
        scores_TE = logits_TE.softmax(-1)
        sorted_TE, order_TE = scores_TE.sort(-1, descending=True)
        keep_TE = top_p_mask(sorted_TE.detach(), s.threshold)
        if s.max_k is not None:
            keep_TE[:, s.max_k :] = False
        weight_TE = sorted_TE
        if s.normalize:
            weight_TE = renormalize(sorted_TE * keep_TE, eps=0.0)
        # pairs rank-major: every token's first choice, then every second choice that was kept, ...
        rank_N, token_N = keep_TE.t().nonzero(as_tuple=True)
        return Assignment(
            token_N=token_N,
            expert_N=order_TE[token_N, rank_N],
            weight_N=weight_TE[token_N, rank_N].to(x_TD.dtype),
            num_tokens=T,
            num_experts=E,
            scores_TE=scores_TE,
            logits_TE=logits_TE,
        )

    def extra_repr(self) -> str:
        return f"threshold={self.spec.threshold}, max_k={self.spec.max_k}"
