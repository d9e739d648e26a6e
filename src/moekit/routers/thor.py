"""THOR: transformer with stochastic experts (Zuo et al. 2022, "Taming Sparsely Activated Transformer with
Stochastic Experts", ICLR 2022, arXiv:2110.04260).

No router. In training, each call draws one expert uniformly at random and sends the whole minibatch to it
(weight 1). The model is run twice on the same batch (two independent draws per layer) and trained with
CE_1 + CE_2 + alpha * consistency, where consistency is the symmetric KL between the two passes' output
distributions: :func:`thor_consistency_loss`, which the training loop calls on the two passes' logits. At
inference each token (``eval_mode="token"``, the authors' level 0) or the whole call (``"batch"``) draws a random
expert. The authors use 2 experts and alpha = 5.0 for IWSLT14 (1.0 by default).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..assignment import Assignment
from ..spec import register_spec
from ..protocols import RouteContext
from .base import Router, RouterSpec

_EVAL_MODES = ("token", "batch")


@register_spec("thor", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class THOR(RouterSpec):
    """Random expert per call in training (Zuo et al. 2022).

    Args:
        eval_mode: ``"token"``: each token draws its own random expert at inference; ``"batch"``: one draw per call.
    """

    consistency_passes = 2  # train on two stochastic passes + thor_consistency_loss
    eval_mode: str = "token"

    def __post_init__(self) -> None:
        if self.eval_mode not in _EVAL_MODES:
            raise ValueError(f"THOR: unknown eval_mode {self.eval_mode!r}; valid choices: {', '.join(_EVAL_MODES)}")

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        return 0.0  # no router

    def build(self, dim: int, num_experts: int) -> "THORRouter":
        return THORRouter(num_experts, self)


class THORRouter(Router):
    def __init__(self, num_experts: int, spec: THOR) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts = num_experts

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        T = x_TD.shape[0]
        if self.training or self.spec.eval_mode == "batch":
            e = torch.randint(self.num_experts, (1,), device=x_TD.device)
            idx_T1 = e.expand(T).reshape(T, 1)
        else:
            idx_T1 = torch.randint(self.num_experts, (T, 1), device=x_TD.device)
        return Assignment.from_topk(idx_T1, x_TD.new_ones(T, 1), self.num_experts)

    def extra_repr(self) -> str:
        return f"eval_mode={self.spec.eval_mode}"


def thor_consistency_loss(
    logits_a: Tensor, logits_b: Tensor, alpha: float = 1.0, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """THOR's consistency regulariser: alpha * 1/2 * sum_v (p_a - p_b)(log p_a - log p_b), the symmetric KL between
    the output distributions of two stochastic passes, per position; averaged (``"mean"``) or summed (``"sum"``)
    over the positions where ``mask`` is True (e.g. non-pad tokens).

    Args:
        logits_a, logits_b: (..., V) logits of the two passes.
        alpha: the regulariser weight (THOR: 5.0 on IWSLT14, 1.0 by default).
        mask: optional bool (...,) of positions to count.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"thor_consistency_loss: shapes differ, {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"thor_consistency_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    logp_a, logp_b = logits_a.log_softmax(-1), logits_b.log_softmax(-1)
    sym_kl = 0.5 * ((logp_a.exp() - logp_b.exp()) * (logp_a - logp_b)).sum(-1)
    if mask is not None:
        sym_kl = sym_kl[mask]
    total = sym_kl.sum() if reduction == "sum" else sym_kl.mean()
    return alpha * total
