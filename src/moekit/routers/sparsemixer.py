"""SparseMixer routing (Liu et al. 2023, "Sparse Backpropagation for MoE Training"; Microsoft Phi-3.5-MoE / PhiMoE).

Logits ``s = W x`` (input dtype, no bias). The k experts are chosen one after the other; pass ``j`` (0-based) sees
the logits with the experts chosen so far set to ``-inf`` (``m``), and:

- ``mx = max(m)``; every expert with ``(mx - s_e) / max(|s_e|, mx) > 2 * eps`` is masked out (``-inf``) as well:
  only the experts within a relative ``2 * eps`` of the best remaining one stay eligible (``eps`` is PhiMoE's
  ``router_jitter_noise``);
- ``p = softmax(masked)`` over the eligible experts;
- evaluation: the expert is ``argmax(m)``; training: it is sampled, ``argmax(masked + Gumbel)``;
- the weight is ``p`` at the chosen expert. In training it is ``c * p_chosen`` with ``c = 1`` when the sampled
  expert is the argmax of ``p`` or with probability 1/4, else ``0.3333`` (Heun's third-order midpoint), and its
  gradient is SparseMixer's estimate ``dL/ds = g * p_chosen * (onehot(chosen) - p)`` with ``g = dL/dw`` (no
  gradient through ``p_chosen`` itself, none through ``c``).

The random draws (one Gumbel (T, E) and one uniform (T, 1) sample per pass, in that order) follow PhiMoE's code, so a
seeded training run draws the same experts as transformers' ``PhimoeSparseMoeBlock``. ``scores_TE`` (for balance
losses and statistics) is the plain softmax of the logits.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..assignment import Assignment
from ..protocols import RouteContext
from ..spec import register_spec
from .base import Router, RouterSpec


@register_spec("sparsemixer", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseMixer(RouterSpec):
    """SparseMixer top-k (PhiMoE: ``k=2``, ``eps=router_jitter_noise``).

    Args:
        k: experts per token, chosen one pass after the other (PhiMoE always routes 2).
        eps: relative width of the eligible window around the best remaining logit (``2 * eps``).
        input_jitter: multiplicative jitter U(1 - j, 1 + j) on the router input, training only (PhiMoE's
            ``input_jitter_noise``; PhiMoE also jitters the experts' input, which moekit does not).
    """

    k: int = 2
    eps: float = 0.01
    input_jitter: float = 0.0
    nonnegative_fields = ("eps", "input_jitter")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"SparseMixer: k must be >= 1, got {self.k}")
        if not self.input_jitter < 1.0:
            raise ValueError(f"SparseMixer: input_jitter must be in [0, 1), got {self.input_jitter}")

    def validate(self, num_experts: int) -> None:
        if self.k > num_experts:
            raise ValueError(f"SparseMixer: k={self.k} is larger than the number of experts ({num_experts})")

    def build(self, dim: int, num_experts: int) -> "SparseMixerRouter":
        self.validate(num_experts)
        return SparseMixerRouter(dim, num_experts, self)


class _HeunMultiplier(torch.autograd.Function):
    """Forward ``w * c``; backward to the logits only: ``g_w * w * (onehot(idx) - p)`` (SparseMixer)."""

    @staticmethod
    def forward(ctx, logits_TE: Tensor, w_T1: Tensor, idx_T1: Tensor, p_TE: Tensor, c_T1: Tensor) -> Tensor:
        ctx.save_for_backward(w_T1, idx_T1, p_TE)
        return w_T1 * c_T1

    @staticmethod
    def backward(ctx, g_T1: Tensor):
        w_T1, idx_T1, p_TE = ctx.saved_tensors
        g_T1 = g_T1 * w_T1
        grad_TE = p_TE * -g_T1
        grad_TE = grad_TE.scatter_add(-1, idx_T1, g_T1)
        return grad_TE, None, None, None, None


def _pass(logits_TE: Tensor, remaining_TE: Tensor, eps: float, training: bool, later: bool) -> tuple[Tensor, Tensor]:
    """One SparseMixer pass: (weight (T, 1), chosen expert (T, 1))."""
    with torch.no_grad():
        best_T1, argmax_T1 = remaining_TE.max(dim=-1, keepdim=True)
        factor_TE = logits_TE.abs().clamp(min=best_T1)
        outside_TE = ((best_T1 - logits_TE) / factor_TE) > (2 * eps)
    masked_TE = remaining_TE.masked_fill(outside_TE, float("-inf"))
    if training:
        gumbel_TE = torch.empty_like(masked_TE, memory_format=torch.legacy_contiguous_format).exponential_().log()
        idx_T1 = (masked_TE - gumbel_TE).max(dim=-1)[1].unsqueeze(-1)
    else:
        idx_T1 = argmax_T1
    p_TE = masked_TE.softmax(-1)
    w_T1 = p_TE.gather(-1, idx_T1)
    if training:
        best_p_T1, best_idx_T1 = p_TE.max(dim=-1, keepdim=True)
        # (the draw order of PhiMoE: a rand_like per pass; the later passes redraw it with uniform_)
        u_T1 = torch.rand_like(best_p_T1)
        if later:
            u_T1 = u_T1.uniform_()
        c_T1 = torch.add(0.3333, torch.logical_or(idx_T1 == best_idx_T1, u_T1 > 0.75), alpha=0.6667).type_as(p_TE)
        w_T1 = _HeunMultiplier.apply(logits_TE, w_T1, idx_T1, p_TE, c_T1)
    return w_T1, idx_T1



class SparseMixerRouter(Router):
    def __init__(self, dim: int, num_experts: int, spec: SparseMixer) -> None:
        super().__init__()
        self.spec = spec
        self.dim, self.num_experts = dim, num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.bias_E = None

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        s = self.spec
        if self.training and s.input_jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - s.input_jitter, 1.0 + s.input_jitter)
        logits_TE = F.linear(x_TD, self.gate.weight.to(x_TD.dtype))
        remaining_TE = logits_TE
        weights, chosen = [], []
        for j in range(s.k):
            w_T1, idx_T1 = _pass(logits_TE, remaining_TE, s.eps, self.training, later=j > 0)
            weights.append(w_T1)
            chosen.append(idx_T1)
            if j + 1 < s.k:
                remaining_TE = remaining_TE.scatter(-1, idx_T1, float("-inf"))
        idx_TK, weight_TK = torch.cat(chosen, -1), torch.cat(weights, -1)
        return Assignment.from_topk(idx_TK, weight_TK.to(x_TD.dtype), self.num_experts, logits_TE.softmax(-1),
                                    logits_TE)

    def extra_repr(self) -> str:
        return f"k={self.spec.k}, eps={self.spec.eps}"
