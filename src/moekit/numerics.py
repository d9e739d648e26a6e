"""Numeric rules every router, balance loss and dispatcher shares (one definition each)."""

from __future__ import annotations

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


def at_least_fp32(t: Tensor) -> Tensor:
    """The routing precision rule: float16 / bfloat16 tensors are computed in float32, others as they are."""
    return t.float() if t.dtype in HALF_DTYPES else t


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it is already ``dtype`` (a no-op ``.to`` still costs a dispatch, which
    counts in the one-token decode path)."""
    return t if t.dtype == dtype else t.to(dtype)


def renormalize(w: Tensor, dim: int = -1, eps: float = 1e-20) -> Tensor:
    """``w / (w.sum(dim) + eps)``: selected weights that sum to one (an all-zero row stays zero, not NaN). ``eps=0``
    only where every row's sum is known to be positive (one op fewer)."""
    return w / w.sum(dim, keepdim=True) if eps == 0 else w / (w.sum(dim, keepdim=True) + eps)
