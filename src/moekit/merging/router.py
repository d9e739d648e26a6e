"""The per-example router of SMEAR (Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive Routing").

One routing decision per *example*, not per token: ``u = LN(mean over positions of x)``, ``logits = u @ R~ (+ b)``.
With ``normalize_columns`` each expert column ``R[:, e]`` goes through one shared LayerNorm over D whose gain starts at
1e-2 (the authors' ``normalize_router_weights``; they report it matters for larger models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mean_pool(x_BLD: Tensor, mask_BL: Tensor | None = None) -> Tensor:
    """Mean over positions; with a mask, over the positions where it is True only."""
    if mask_BL is None:
        return x_BLD.mean(dim=1)
    if mask_BL.shape != x_BLD.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(x_BLD.shape[:2])} (batch, positions), got {tuple(mask_BL.shape)}")
    m = mask_BL.to(x_BLD.dtype).unsqueeze(-1)
    count = m.sum(dim=1)
    if bool((count == 0).any()):
        raise ValueError("mask selects no position for some example; cannot mean-pool it")
    return (x_BLD * m).sum(dim=1) / count


class ExampleRouter(nn.Module):
    """``forward(u_BD) -> logits_BE`` on an already pooled input; :meth:`pool` does the pooling and LayerNorm."""

    def __init__(
        self, dim: int, num_experts: int, *, normalize_columns: bool = True, bias: bool = False, input_norm: bool = True
    ) -> None:
        super().__init__()
        self.dim, self.num_experts = dim, num_experts
        self.input_norm = nn.LayerNorm(dim) if input_norm else None
        self.weight_DE = nn.Parameter(torch.randn(dim, num_experts) * 1e-2)
        self.column_norm = nn.LayerNorm(dim) if normalize_columns else None
        if self.column_norm is not None:
            nn.init.constant_(self.column_norm.weight, 1e-2)
        self.bias_E = nn.Parameter(torch.zeros(num_experts)) if bias else None

    def pool(self, x_BLD: Tensor, mask_BL: Tensor | None = None) -> Tensor:
        u_BD = mean_pool(x_BLD, mask_BL)
        return u_BD if self.input_norm is None else self.input_norm(u_BD)

    def weight(self) -> Tensor:
        """The (D, E) routing matrix after the optional per-column LayerNorm."""
        if self.column_norm is None:
            return self.weight_DE
        return self.column_norm(self.weight_DE.t()).t()

    def forward(self, u_BD: Tensor) -> Tensor:
        return F.linear(u_BD, self.weight().t(), self.bias_E)

    def extra_repr(self) -> str:
        return f"D={self.dim}, E={self.num_experts}, column_norm={self.column_norm is not None}"
