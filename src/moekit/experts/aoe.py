"""Autonomy-of-Experts expert bank (Lv et al. 2025, "Autonomy-of-Experts Models", ICML 2025, arXiv:2501.13074).

Each expert's gate projection is factorised, W_g^e = W_down^e (D x r) W_up^e (r x F). The router-free AoE layer
(:class:`moekit.routers.aoe.AoE`) ranks experts by the norm of a_e = x W_down^e; the selected experts compute
``(act(a_e W_up^e) * (x W_3^e)) W_2^e``. Here ``a_e`` is recomputed for the routed pairs (an r x D product per pair,
identical values) rather than carried from the router; the authors reuse it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..ops.grouped import IMPLS, grouped_linear
from ..spec import Spec, register_spec
from .activations import ACTIVATIONS


@register_spec("aoe", "experts")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AoEExperts(Spec):
    """Experts with a low-rank gate projection, for Autonomy-of-Experts routing.

    Args:
        hidden_dim: F, hidden units per expert (default 4 * dim).
        rank: r, the width of W_down (the authors' ``D_LOW``); the router reads ||x W_down^e||.
        activation: a name from ``moekit.experts.ACTIVATIONS``.
        impl: grouped linear implementation (``"auto"``, ``"grouped_mm"``, ``"loop"``).
    """

    hidden_dim: int | None = None
    rank: int = 64
    activation: str = "silu"
    impl: str = "auto"

    def __post_init__(self) -> None:
        ACTIVATIONS.get(self.activation)
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"AoEExperts: hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.rank < 1:
            raise ValueError(f"AoEExperts: rank must be >= 1, got {self.rank}")
        if self.impl not in IMPLS:
            raise ValueError(f"AoEExperts: unknown impl {self.impl!r}; valid choices: {', '.join(IMPLS)}")

    def pair_flops_E(self, dim: int, num_experts: int) -> Tensor:
        """Forward FLOPs of one (token, expert) pair: a_e W_up, x W3, h W2 (x W_down is the router's)."""
        F_ = self.hidden_dim or 4 * dim
        return torch.full((num_experts,), 2.0 * (self.rank * F_ + 2 * dim * F_), dtype=torch.float64)

    def build(self, dim: int, num_experts: int) -> "AoEBank":
        return AoEBank(num_experts, dim, self.hidden_dim or 4 * dim, self)


def _uniform(w: Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(w, -bound, bound)


class AoEBank(nn.Module):
    """``forward(x_ND, counts_E, expert_N) -> y_ND`` like :class:`moekit.experts.ExpertBank`, plus
    :meth:`router_logits` for the AoE router."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, spec: AoEExperts) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts, self.dim, self.hidden_dim, self.rank = num_experts, dim, hidden_dim, spec.rank
        self.act = ACTIVATIONS.get(spec.activation)
        E, D, Fh, R = num_experts, dim, hidden_dim, spec.rank
        self.w_down_ERD = nn.Parameter(torch.empty(E, R, D))
        self.w_up_EFR = nn.Parameter(torch.empty(E, Fh, R))
        self.w3_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.w2_EDF = nn.Parameter(torch.empty(E, D, Fh))
        _uniform(self.w_down_ERD, D)
        _uniform(self.w_up_EFR, R)
        _uniform(self.w3_EFD, D)
        _uniform(self.w2_EDF, Fh)

    def router_logits(self, x_TD: Tensor) -> Tensor:
        """logit_{t,e} = ||x_t W_down^e||_2 for every expert: one (D x E r) product."""
        T = x_TD.shape[0]
        a_TER = (x_TD @ self.w_down_ERD.reshape(-1, self.dim).T).view(T, self.num_experts, self.rank)
        return torch.linalg.vector_norm(a_TER, dim=-1)

    def forward(self, x_ND: Tensor, counts_E: Tensor, expert_N: Tensor | None = None) -> Tensor:
        impl = self.spec.impl
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        counts_list = None if impl == "grouped_mm" else counts_E.tolist()

        def proj(x: Tensor, w: Tensor) -> Tensor:
            return grouped_linear(x, w, counts_E, offsets_E, counts_list, impl)

        a_NR = proj(x_ND, self.w_down_ERD)
        h_NF = self.act(proj(a_NR, self.w_up_EFR)) * proj(x_ND, self.w3_EFD)
        return proj(h_NF, self.w2_EDF)

    def expert_forward(self, e: int, x_TD: Tensor) -> Tensor:
        a = x_TD @ self.w_down_ERD[e].T
        h = self.act(a @ self.w_up_EFR[e].T) * (x_TD @ self.w3_EFD[e].T)
        return h @ self.w2_EDF[e].T

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.dim}, F={self.hidden_dim}, r={self.rank}, act={self.spec.activation}"
