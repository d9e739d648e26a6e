"""MoE++ (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts",
ICLR 2025, arXiv:2410.07348): zero-computation experts beside the FFN experts, gating residuals, and the
heterogeneous load-balancing loss.

Experts: ids ``[0, N)`` are the layer's FFN experts (``MoE(dim, N, ...)``), then ``constant`` constant experts,
``copy`` copy experts and ``zero`` zero experts (the released 7B model is "16+4": 2 constant, 1 copy, 1 zero; that
is the default here). The compute-free experts are a layer-level part, ``layer.free_experts``
(:class:`moekit.experts.zero_compute.ZeroComputeExperts`, built from ``MoEPP.build_free_experts``); their pairs never
reach the expert bank.

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
from ..balance.specs import HeteroBalanceLoss  # noqa: F401  (re-exported; it lives in moekit.balance)
from ..numerics import at_least_fp32, renormalize
from ..experts.zero_compute import ZeroComputeExperts
from ..spec import register_spec
from ..protocols import RouteContext
from .base import Router, RouterSpec


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

    @property
    def num_free_experts(self) -> int:
        return self.num_zero_compute

    @property
    def needs_prev_logits(self) -> bool:
        return self.gating_residual

    def at_layer(self, index: int) -> "MoEPP":
        return dataclasses.replace(self, gating_residual=index > 0)

    def build_free_experts(self, dim: int) -> ZeroComputeExperts:
        return ZeroComputeExperts(dim, constant=self.constant, copy=self.copy, zero=self.zero)

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        E = num_experts + self.num_zero_compute
        gate = dim * E if self.router_hidden_mult is None else (dim + E) * self.router_hidden_mult * E
        return float(gate + (E * E if self.gating_residual else 0))

    def validate(self, num_experts: int) -> None:
        if self.k > num_experts + self.num_zero_compute:
            raise ValueError(
                f"MoEPP: k={self.k} is larger than the {num_experts} FFN + {self.num_zero_compute} "
                "zero-computation experts"
            )

    def build(self, dim: int, num_experts: int) -> "MoEPPRouter":
        self.validate(num_experts)
        return MoEPPRouter(dim, num_experts, self)


class MoEPPRouter(Router):
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
        self.first_zero = E - spec.zero  # ids >= first_zero are zero experts

    def logits(self, x_TD: Tensor, prev_logits: Tensor | None = None) -> Tensor:
        if self.residual is not None and prev_logits is None:
            raise ValueError(
                "MoEPP: gating_residual=True needs the previous MoE layer's logits: call "
                "layer(x, prev_logits=prev_out.assignment.logits_TE); use gating_residual=False for the first layer"
            )
        if self.residual is None and prev_logits is not None:
            raise ValueError("MoEPP: prev_logits given but the router was built with gating_residual=False")
        x_TD = at_least_fp32(x_TD)  # route in float32
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

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        prev_logits = ctx.prev_logits_TE
        if prev_logits is not None:
            prev_logits = prev_logits.reshape(x_TD.shape[0], -1)
        logits_TE = self.logits(x_TD, prev_logits)
        scores_TE = logits_TE.softmax(-1)
        g_TK, idx_TK = scores_TE.topk(self.spec.k, dim=-1)
        g_TK = g_TK.masked_fill(idx_TK >= self.first_zero, 0.0)
        g_TK = renormalize(g_TK)
        a = Assignment.from_topk(idx_TK, g_TK.to(x_TD.dtype), self.num_experts, scores_TE, logits_TE)
        return dataclasses.replace(a, num_free_experts=self.spec.num_zero_compute)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"k={s.k}, ffn={self.num_ffn_experts}, constant={s.constant}, copy={s.copy}, zero={s.zero}, "
            f"gating_residual={s.gating_residual}"
        )
