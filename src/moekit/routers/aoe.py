"""Autonomy-of-Experts routing (Lv et al. 2025, "Autonomy-of-Experts Models", ICML 2025, arXiv:2501.13074).

There is no router: the experts select themselves. Every expert computes a_e = x W_down^e (the first, low-rank
factor of its gate projection; see :class:`moekit.experts.aoe.AoEExperts`), its logit is ||a_e||_2, p = softmax over
experts, and the top-k experts by p run and are weighted by p (not renormalised by default, as in the authors'
megablocks dMoE setup). The usual load-balancing loss applies (``SwitchLoss``). Use with
``MoE(dim, E, router=AoE(k=2), experts=AoEExperts(hidden_dim=F, rank=r))``; the layer binds the bank to the router (the spec declares ``reads_experts``).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from ..assignment import Assignment
from ..numerics import renormalize
from ..experts.aoe import AoEBank
from ..spec import register_spec
from ..protocols import RouteContext
from .base import Router, RouterSpec


@register_spec("aoe", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AoE(RouterSpec):
    """Norm-based self-selection of experts (Lv et al. 2025); needs ``experts=AoEExperts(...)``.

    Args:
        k: experts per token.
        normalize: renormalise the k selected probabilities to sum to one.
    """

    reads_experts = True  # the layer calls router.bind_experts(bank); the experts cannot be sharded over ranks
    k: int = 2
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"AoE: k must be >= 1, got {self.k}")

    def validate(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"AoE: k={self.k} is larger than the number of experts ({num_experts})")

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        # the norm router reads x W_down of every expert: E * rank * dim multiply-adds
        if experts is None:
            raise ValueError("AoE.flops_per_token needs the layer's expert spec (AoEExperts) for its rank")
        return float(num_experts * experts.rank * dim)

    def build(self, dim: int, num_experts: int) -> "AoERouter":
        self.validate(num_experts)
        return AoERouter(num_experts, self)


class AoERouter(Router):
    """Parameter-free: reads the bound :class:`AoEBank`. The bank is held by plain reference (not a submodule), so
    its parameters appear once in the layer, under ``experts``."""

    def __init__(self, num_experts: int, spec: AoE) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts = num_experts
        self._bank: tuple[AoEBank, ...] = ()

    def bind_experts(self, bank: nn.Module) -> None:
        if not isinstance(bank, AoEBank):
            raise ValueError(
                f"AoE routing needs experts=AoEExperts(...) (experts with a low-rank gate), got {type(bank).__name__}"
            )
        if bank.num_experts != self.num_experts:
            raise ValueError(f"AoE: bank has {bank.num_experts} experts, router expects {self.num_experts}")
        self._bank = (bank,)

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        if not self._bank:
            raise ValueError("AoE router is not bound to an expert bank; build it through MoE(..., router=AoE())")
        logits_TE = self._bank[0].router_logits(x_TD)
        scores_TE = logits_TE.softmax(-1)
        w_TK, idx_TK = scores_TE.topk(self.spec.k, dim=-1)
        if self.spec.normalize:
            w_TK = renormalize(w_TK, eps=0.0)
        return Assignment.from_topk(idx_TK, w_TK, self.num_experts, scores_TE, logits_TE)

    def extra_repr(self) -> str:
        return f"k={self.spec.k}, normalize={self.spec.normalize} (router-free: expert norms)"
