"""Grouped linear: rows of ``x_ND`` are contiguous per expert; each group multiplies its own weight.

Two implementations with one contract:
- ``torch.nn.functional.grouped_mm`` (one kernel, float32/bfloat16/float16);
- a split loop over ``w.unbind(0)`` (any dtype, float64 for tests). Slicing ``w[e]`` in a loop would make autograd
  allocate a full-size zero gradient per expert; ``unbind`` does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "grouped_mm", "loop")


def grouped_mm_available(dtype: torch.dtype, *dims: int) -> bool:
    """True when ``F.grouped_mm`` exists for ``dtype`` and every matrix dim gives 16-byte aligned strides."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (
        hasattr(F, "grouped_mm")
        and dtype in _GROUPED_MM_DTYPES
        and all(d * itemsize % 16 == 0 for d in dims)
    )


def _contiguous_grad(t: Tensor) -> Tensor:
    # grouped_mm's backward rejects stride-0 gradients (e.g. from .sum()); make them dense.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_linear(
    x_ND: Tensor,
    w_EOI: Tensor,
    counts_E: Tensor,
    offsets_E: Tensor | None = None,
    counts_list: list[int] | None = None,
    impl: str = "auto",
) -> Tensor:
    """``y[rows of e] = x[rows of e] @ w[e].T`` for weights stored like ``nn.Linear`` (E, out, in)."""
    if impl == "auto":
        usable = grouped_mm_available(x_ND.dtype, *w_EOI.shape[1:]) and x_ND.shape[0] > 0
        impl = "grouped_mm" if usable else "loop"
    if impl == "grouped_mm":
        if offsets_E is None:
            offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return _contiguous_grad(F.grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=offsets_E))
    if impl != "loop":
        raise ValueError(f"unknown grouped_linear impl {impl!r}; valid choices: {', '.join(IMPLS)}")
    if counts_list is None:
        counts_list = counts_E.tolist()
    outs = [
        F.linear(x_e, w_e) for x_e, w_e, n in zip(x_ND.split(counts_list), w_EOI.unbind(0), counts_list) if n > 0
    ]
    if not outs:
        return x_ND.new_zeros(0, w_EOI.shape[1]) + 0 * w_EOI.sum()
    return torch.cat(outs)
