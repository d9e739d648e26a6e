"""Zero-computation experts (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with
Zero-Computation Experts", ICLR 2025, arXiv:2410.07348); the zero expert is also AdaMoE's null expert.

- zero expert: E(x) = 0 (discard);
- copy expert: E(x) = x (skip);
- constant expert: E(x) = a1 x + a2 v, with [a1, a2] = softmax(W_c x), W_c in R^{2 x D} (no bias) and a learned
  vector v in R^D initialised N(0, 1) (replace).

They cost no matmul: the layer never dispatches their pairs to the expert bank; it calls this module in combine
with the (token, slot, weight) pairs, where slots count from 0 in the order constant, copy, zero. Zero pairs are
dropped on the spot. (The constant expert's two-way gate is a D-length dot product per pair, not an FFN.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..assignment import Assignment


class ZeroComputeExperts(nn.Module):
    """``forward(x_TD, free) -> y_TD``: the weighted sum of the compute-free experts each token selected.

    Args:
        dim: model dimension D.
        constant, copy, zero: how many experts of each kind; slots are ``[0, constant)`` constant experts, then
            ``copy`` copy experts, then ``zero`` zero experts.
    """

    def __init__(self, dim: int, *, constant: int = 0, copy: int = 0, zero: int = 0) -> None:
        super().__init__()
        if min(constant, copy, zero) < 0:
            raise ValueError(f"ZeroComputeExperts: counts must be >= 0, got {constant=}, {copy=}, {zero=}")
        self.dim = dim
        self.num_constant, self.num_copy, self.num_zero = constant, copy, zero
        if constant:
            self.wc_C2D = nn.Parameter(torch.empty(constant, 2, dim))
            self.v_CD = nn.Parameter(torch.empty(constant, dim))
        else:
            self.wc_C2D = self.v_CD = None
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.num_constant + self.num_copy + self.num_zero

    def kinds(self) -> list[str]:
        """The kind of each slot, in slot order."""
        return ["constant"] * self.num_constant + ["copy"] * self.num_copy + ["zero"] * self.num_zero

    def reset_parameters(self) -> None:
        if self.wc_C2D is not None:
            bound = 1.0 / math.sqrt(self.dim)  # nn.Linear's default range for W_c
            nn.init.uniform_(self.wc_C2D, -bound, bound)
            nn.init.normal_(self.v_CD)

    def expert_forward(self, slot: int, x_TD: Tensor) -> Tensor:
        """Run compute-free expert ``slot`` alone on ``x_TD`` (reference and inspection)."""
        kind = self.kinds()[slot]
        if kind == "zero":
            return torch.zeros_like(x_TD)
        if kind == "copy":
            return x_TD
        alpha_T2 = (x_TD @ self.wc_C2D[slot].T).softmax(-1)
        return alpha_T2[:, :1] * x_TD + alpha_T2[:, 1:] * self.v_CD[slot]

    def forward(self, x_TD: Tensor, free: Assignment) -> Tensor:
        out_TD = x_TD.new_zeros(x_TD.shape)
        C = self.num_constant
        if self.num_zero:  # 0 * weight: a NaN / Inf combine weight on a zero expert still poisons its row
            zero_N = free.expert_N >= C + self.num_copy
            w_T = x_TD.new_zeros(x_TD.shape[0]).index_add(0, free.token_N[zero_N], free.weight_N[zero_N].to(x_TD.dtype))
            out_TD = out_TD + (w_T * 0).unsqueeze(-1)
        live_N = free.expert_N < C + self.num_copy  # zero experts contribute nothing: drop their pairs
        token_M, slot_M = free.token_N[live_N], free.expert_N[live_N]
        weight_M = free.weight_N[live_N].to(x_TD.dtype)
        if token_M.numel() == 0:
            return out_TD
        x_MD = x_TD.index_select(0, token_M)
        if C == 0:
            return out_TD.index_add(0, token_M, weight_M.unsqueeze(-1) * x_MD)
        # constant experts: [a1, a2] = softmax(W_c x), one small (n_c, D) x (D, 2) product per constant expert
        alpha_M2 = x_MD.new_zeros(token_M.numel(), 2)
        for c in range(C):
            rows = (slot_M == c).nonzero().squeeze(1)
            gate_n2 = x_MD.index_select(0, rows) @ self.wc_C2D[c].T.to(x_TD.dtype)
            alpha_M2 = alpha_M2.index_put((rows,), gate_n2.softmax(-1))
        is_const_M = slot_M < C
        # copy: a_x = 1, a_v = 0; constant: a_x = a1, a_v = a2
        a_x_M = torch.where(is_const_M, alpha_M2[:, 0], torch.ones_like(weight_M))
        a_v_M = torch.where(is_const_M, alpha_M2[:, 1], torch.zeros_like(weight_M))
        v_MD = self.v_CD.to(x_TD.dtype).index_select(0, slot_M.clamp(max=C - 1))
        y_MD = a_x_M.unsqueeze(-1) * x_MD + a_v_M.unsqueeze(-1) * v_MD
        return out_TD.index_add(0, token_M, weight_M.unsqueeze(-1) * y_MD)

    def extra_repr(self) -> str:
        return f"constant={self.num_constant}, copy={self.num_copy}, zero={self.num_zero}"
