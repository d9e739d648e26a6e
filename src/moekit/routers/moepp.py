"""MoE++ (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts",
ICLR 2025, arXiv:2410.07348): zero-computation experts beside the FFN experts, gating residuals, and the
heterogeneous load-balancing loss.

Experts: ids ``[0, N)`` are the layer's FFN experts (``MoE(dim, N, ...)``), then ``constant`` constant experts,
``copy`` copy experts and ``zero`` zero experts (the released 7B model is "16+4": 2 constant, 1 copy, 1 zero; that
is the default here). The compute-free experts live in ``router.free_experts``
(:class:`moekit.experts.zero_compute.ZeroComputeExperts`); their pairs never reach the expert bank.

Routing (released code, default mode):
- l = W2 tanh(W1 x) with W1: D -> 8(N+M), W2: 8(N+M) -> N+M, no biases (``router_hidden_mult=None`` for one
  linear map), in float32;
- gating residual: l += G(l_prev), G a bias-free Linear (N+M) -> (N+M), l_prev the previous MoE layer's logits
  *after* its own residual (``out.assignment.logits_TE``). Pass them explicitly:
  ``out = moe.forward_with_aux(x, prev_logits=prev.assignment.logits_TE)``. The first MoE layer has none
  (``gating_residual=False``);
- p = softmax(l); (g, idx) = top-k(p); g = 0 where idx is a zero expert; g <- g / sum(g).
  So "FFN + zero" gives the FFN expert weight 1.
- y = sum_j g_j E_idx_j(x).

Heterogeneous load balance (:class:`HeteroBalanceLoss`): L_b = sum_i eta_i f_i P_i over all N+M experts, with
eta = 1 for FFN experts and tau for zero-computation ones, f_i the fraction of tokens that selected i and P_i the
mean router probability of i. A larger tau sends fewer tokens to the zero-computation experts. tau = 0.75 and
coefficient 0.01 are the values we recall from the paper (unverified; the training code was not released).

Not reproduced: the released code multiplies the expert input by k (``x_in = 2x``) unless
``moe_feature_no_mul_topk``; moekit passes x unchanged (scale the input yourself to match), and the optional
std-normalisation of the logits is omitted.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..assignment import Assignment
from ..balance.specs import BalanceSpec
from ..experts.zero_compute import ZeroComputeExperts
from ..spec import register_spec
from .base import RouterSpec


@register_spec("moepp", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEPP(RouterSpec):
    """MoE++ routing over N FFN experts plus zero-computation experts (Jin et al. 2024).

    Args:
        k: experts per token, FFN and zero-computation together (2 in the paper).
        constant, copy, zero: how many zero-computation experts of each kind (2, 1, 1 in the released model).
        router_hidden_mult: hidden width of the 2-layer tanh router as a multiple of N+M (8 in the released code);
            None for a single linear map.
        gating_residual: add G(prev_logits) to the logits; the layer then needs ``prev_logits`` on every call.
            Use False for the first MoE layer of a model.
    """

    k: int = 2
    constant: int = 2
    copy: int = 1
    zero: int = 1
    router_hidden_mult: int | None = 8
    gating_residual: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"MoEPP: k must be >= 1, got {self.k}")
        if min(self.constant, self.copy, self.zero) < 0:
            raise ValueError(
                f"MoEPP: expert counts must be >= 0, got constant={self.constant}, copy={self.copy}, zero={self.zero}"
            )
        if self.router_hidden_mult is not None and self.router_hidden_mult < 1:
            raise ValueError(f"MoEPP: router_hidden_mult must be >= 1 or None, got {self.router_hidden_mult}")

    @property
    def num_zero_compute(self) -> int:
        return self.constant + self.copy + self.zero

    def validate(self, num_experts: int) -> None:
        if self.k > num_experts + self.num_zero_compute:
            raise ValueError(
                f"MoEPP: k={self.k} is larger than the {num_experts} FFN + {self.num_zero_compute} "
                "zero-computation experts"
            )

    def build(self, dim: int, num_experts: int) -> "MoEPPRouter":
        self.validate(num_experts)
        return MoEPPRouter(dim, num_experts, self)


class MoEPPRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int, spec: MoEPP) -> None:
        super().__init__()
        self.spec = spec
        self.num_ffn_experts = num_experts
        self.num_experts = E = num_experts + spec.num_zero_compute
        if spec.router_hidden_mult is None:
            self.gate = nn.Linear(dim, E, bias=False)
        else:
            H = spec.router_hidden_mult * E
            self.gate = nn.Sequential(nn.Linear(dim, H, bias=False), nn.Tanh(), nn.Linear(H, E, bias=False))
        self.residual = nn.Linear(E, E, bias=False) if spec.gating_residual else None
        self.free_experts = ZeroComputeExperts(dim, constant=spec.constant, copy=spec.copy, zero=spec.zero)
        self.first_zero = E - spec.zero  # ids >= first_zero are zero experts

    def logits(self, x_TD: Tensor, prev_logits: Tensor | None = None) -> Tensor:
        if self.residual is not None and prev_logits is None:
            raise ValueError(
                "MoEPP: gating_residual=True needs the previous MoE layer's logits: call "
                "layer(x, prev_logits=prev_out.assignment.logits_TE); use gating_residual=False for the first layer"
            )
        if self.residual is None and prev_logits is not None:
            raise ValueError("MoEPP: prev_logits given but the router was built with gating_residual=False")
        x_TD = x_TD.float() if x_TD.dtype in (torch.float16, torch.bfloat16) else x_TD  # route in float32
        if isinstance(self.gate, nn.Linear):
            logits_TE = F.linear(x_TD, self.gate.weight.to(x_TD.dtype))
        else:
            h_TH = torch.tanh(F.linear(x_TD, self.gate[0].weight.to(x_TD.dtype)))
            logits_TE = F.linear(h_TH, self.gate[2].weight.to(x_TD.dtype))
        if self.residual is not None:
            if prev_logits.shape != logits_TE.shape:
                raise ValueError(
                    f"MoEPP: prev_logits must have shape {tuple(logits_TE.shape)} (tokens, {self.num_experts} "
                    f"experts), got {tuple(prev_logits.shape)}"
                )
            dt = logits_TE.dtype
            logits_TE = logits_TE + F.linear(prev_logits.to(dt), self.residual.weight.to(dt))
        return logits_TE

    def forward(self, x_TD: Tensor, task: Tensor | None = None, prev_logits: Tensor | None = None) -> Assignment:
        logits_TE = self.logits(x_TD, prev_logits)
        scores_TE = logits_TE.softmax(-1)
        g_TK, idx_TK = scores_TE.topk(self.spec.k, dim=-1)
        g_TK = g_TK.masked_fill(idx_TK >= self.first_zero, 0.0)
        g_TK = g_TK / (g_TK.sum(-1, keepdim=True) + 1e-20)
        a = Assignment.from_topk(idx_TK, g_TK.to(x_TD.dtype), self.num_experts, scores_TE, logits_TE)
        return dataclasses.replace(a, num_free_experts=self.spec.num_zero_compute)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"k={s.k}, ffn={self.num_ffn_experts}, constant={s.constant}, copy={s.copy}, zero={s.zero}, "
            f"gating_residual={s.gating_residual}"
        )


def hetero_balance_loss(a: Assignment, tau: float) -> Tensor:
    """MoE++'s heterogeneous load-balancing loss, sum_i eta_i f_i P_i over all experts (FFN and
    zero-computation), eta_i = 1 for FFN experts and ``tau`` for the ``a.num_free_experts`` zero-computation ones;
    f_i = (tokens that selected i) / T, P_i = mean_t p_{t,i}."""
    if a.scores_TE is None:
        raise ValueError("the heterogeneous balance loss needs router scores (Assignment.scores_TE)")
    P_E = a.scores_TE.mean(0)
    f_E = a.counts_E().to(P_E.dtype) / max(a.num_tokens, 1)
    eta_E = torch.ones_like(P_E)
    eta_E[a.num_bank_experts :] = tau
    return (eta_E * f_E * P_E).sum()


@register_spec("hetero_balance", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class HeteroBalanceLoss(BalanceSpec):
    """MoE++ heterogeneous load balance, ``coef * sum_i eta_i f_i P_i`` (eta = 1 FFN, tau zero-computation).
    Defaults coef 0.01, tau 0.75 (recalled from the paper)."""

    coef: float = 0.01
    tau: float = 0.75

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"HeteroBalanceLoss: tau must be > 0, got {self.tau}")

    def loss(self, a: Assignment) -> Tensor:
        return self.coef * hetero_balance_loss(a, self.tau)
