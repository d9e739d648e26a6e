"""Two numeric rules every router and balance loss shares (one definition each)."""

from __future__ import annotations

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


def at_least_fp32(t: Tensor) -> Tensor:
    """The routing precision rule: float16 / bfloat16 tensors are computed in float32, others as they are."""
    return t.float() if t.dtype in HALF_DTYPES else t


def renormalize(w: Tensor, dim: int = -1, eps: float = 1e-20) -> Tensor:
    """``w / (w.sum(dim) + eps)``: selected weights that sum to one (an all-zero row stays zero, not NaN)."""
    return w / (w.sum(dim, keepdim=True) + eps)
