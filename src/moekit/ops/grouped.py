"""Grouped linear: rows of ``x_ND`` are contiguous per expert; each group multiplies its own weight.

Three implementations with one contract:
- ``torch.nn.functional.grouped_mm`` (one kernel, float32/bfloat16/float16);
- ``"native"``: moekit's grouped BLAS call (:func:`moekit.ops.native.grouped_gemm`; CPU float32 with two or more
  threads), every expert's product one single-core BLAS call, the products side by side; forward and backward;
- a split loop over ``w.unbind(0)`` (any dtype, float64 for tests). Slicing ``w[e]`` in a loop would make autograd
  allocate a full-size zero gradient per expert; ``unbind`` does not.

``"auto"`` in an expert bank takes ``native`` where it applies, else grouped_mm where the dtype allows, else the loop.

Under ``torch.compile`` / ``torch.export`` and on the meta device both are hidden behind one custom op,
``moekit::grouped_linear`` (with its own backward ops), whose fake kernel only states the output shape: grouped_mm's
own fake kernel accepts only bfloat16 on CPU, and the loop needs ``counts_E.tolist()``, which breaks ``fullgraph``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "grouped_mm", "native", "loop")


def grouped_mm_available(dtype: torch.dtype, *dims: int) -> bool:
    """True when ``F.grouped_mm`` exists for ``dtype`` and every matrix dim gives 16-byte aligned strides."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (
        hasattr(F, "grouped_mm")
        and dtype in _GROUPED_MM_DTYPES
        and all(d * itemsize % 16 == 0 for d in dims)
    )


def auto_impl(x_ND: Tensor, *w_EOI: Tensor) -> str:
    """``impl="auto"`` for one call whose projections use these weights: ``"native"`` where
    :func:`moekit.ops.native.takes_gemm` holds for the rows and every weight, else ``"grouped_mm"`` where the dtype
    and every weight's dims allow, else ``"loop"`` (also for no rows)."""
    if x_ND.shape[0] == 0:
        return "loop"
    if native.takes_gemm(x_ND, *w_EOI):
        return "native"
    dims = [d for w in w_EOI for d in w.shape[1:]]
    return "grouped_mm" if grouped_mm_available(x_ND.dtype, *dims) else "loop"


def _contiguous_grad(t: Tensor) -> Tensor:
    # grouped_mm's backward rejects stride-0 gradients (e.g. from .sum()); make them dense.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def _eager_grouped_linear(x_ND: Tensor, w_EOI: Tensor, counts_E: Tensor, impl: str) -> Tensor:
    """No autograd: the value of the grouped linear with the chosen implementation (inside the custom ops)."""
    if impl in ("auto", "native"):  # (the custom op runs under tracing, where the native call does not)
        impl = "grouped_mm" if grouped_mm_available(x_ND.dtype, *w_EOI.shape[1:]) and x_ND.shape[0] > 0 else "loop"
    if impl == "grouped_mm":
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return F.grouped_mm(x_ND.contiguous(), w_EOI.transpose(-2, -1), offs=offsets_E)
    out = x_ND.new_empty(x_ND.shape[0], w_EOI.shape[1])
    start = 0
    for n, w_OI in zip(counts_E.tolist(), w_EOI.unbind(0)):
        if n:
            torch.mm(x_ND[start:start + n], w_OI.T, out=out[start:start + n])
        start += n
    return out


@torch.library.custom_op("moekit::grouped_linear", mutates_args=())
def _grouped_linear_op(x_ND: Tensor, w_EOI: Tensor, counts_E: Tensor, impl: str) -> Tensor:
    return _eager_grouped_linear(x_ND, w_EOI, counts_E, impl)


@_grouped_linear_op.register_fake
def _(x_ND, w_EOI, counts_E, impl):
    return x_ND.new_empty(x_ND.shape[0], w_EOI.shape[1])


@torch.library.custom_op("moekit::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad_op(g_NO: Tensor, x_NI: Tensor, counts_E: Tensor, impl: str) -> Tensor:
    """``dw[e] = g[rows of e].T @ x[rows of e]``: (E, O, I)."""
    E, O, I = counts_E.shape[0], g_NO.shape[1], x_NI.shape[1]
    if impl in ("auto", "native"):
        impl = "grouped_mm" if grouped_mm_available(x_NI.dtype, O, I) and x_NI.shape[0] > 0 else "loop"
    if impl == "grouped_mm":
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return F.grouped_mm(g_NO.t(), x_NI.contiguous(), offs=offsets_E)  # g.t(): a column-major view, aligned strides
    out = g_NO.new_zeros(E, O, I)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            torch.mm(g_NO[start:start + n].T, x_NI[start:start + n], out=out[e])
        start += n
    return out


@_grouped_weight_grad_op.register_fake
def _(g_NO, x_NI, counts_E, impl):
    return g_NO.new_empty(counts_E.shape[0], g_NO.shape[1], x_NI.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x_ND, w_EOI, counts_E, impl = inputs
    ctx.save_for_backward(x_ND, w_EOI, counts_E)
    ctx.impl = impl


def _backward(ctx, g_NO: Tensor):
    x_ND, w_EOI, counts_E = ctx.saved_tensors
    g_NO = g_NO.contiguous()
    gx = _grouped_linear_op(g_NO, w_EOI.transpose(-2, -1), counts_E, ctx.impl) if ctx.needs_input_grad[0] else None
    gw = _grouped_weight_grad_op(g_NO, x_ND, counts_E, ctx.impl) if ctx.needs_input_grad[1] else None
    return gx, gw, None, None


_grouped_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _NativeGroupedLinear(torch.autograd.Function):
    """:func:`native.grouped_gemm` forward and backward (the input and weight gradients are grouped BLAS calls too);
    a backward that builds a graph takes grouped_mm's differentiable form."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EOI: Tensor, offsets: list[int]) -> Tensor:
        ctx.save_for_backward(x_ND, w_EOI)
        ctx.offsets = offsets
        return native.grouped_gemm("forward", x_ND.contiguous(), w_EOI, offsets)

    @staticmethod
    def backward(ctx, g_NO: Tensor):
        x_ND, w_EOI = ctx.saved_tensors
        g_NO = g_NO.contiguous()
        if torch.is_grad_enabled() or not native.takes_gemm(g_NO, x_ND, w_EOI):  # create_graph=True: a
            # differentiable per-expert loop (any dims, unlike grouped_mm's 16-byte alignment)
            rows = [slice(a, b) for a, b in zip(ctx.offsets, ctx.offsets[1:])]
            gx = torch.cat([g_NO[r] @ w for r, w in zip(rows, w_EOI.unbind(0))]) if ctx.needs_input_grad[0] else None
            gw = torch.stack([g_NO[r].T @ x_ND[r] for r in rows]) if ctx.needs_input_grad[1] else None
            return gx, gw, None
        gx = native.grouped_gemm("input_grad", g_NO, w_EOI, ctx.offsets) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:  # in the weights' own layout: (E, in, out) storage gets an (E, in, out) gradient
            x_ND = x_ND.contiguous()
            if native.weights_transposed(w_EOI):
                gw = native.grouped_gemm("weight_grad", x_ND, g_NO, ctx.offsets).transpose(1, 2)
            else:
                gw = native.grouped_gemm("weight_grad", g_NO, x_ND, ctx.offsets)
        return gx, gw, None


def _tracing(x: Tensor) -> bool:
    return torch.compiler.is_compiling() or x.device.type == "meta"


def grouped_linear(
    x_ND: Tensor,
    w_EOI: Tensor,
    counts_E: Tensor,
    offsets_E: Tensor | None = None,
    counts_list: list[int] | None = None,
    impl: str = "auto",
) -> Tensor:
    """``y[rows of e] = x[rows of e] @ w[e].T`` for weights stored like ``nn.Linear`` (E, out, in)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_linear impl {impl!r}; valid choices: {', '.join(IMPLS)}")
    if _tracing(x_ND):  # compile / export / meta: one opaque op with a shape-only fake kernel
        return _grouped_linear_op(x_ND, w_EOI, counts_E, impl)
    if impl == "auto":
        usable = grouped_mm_available(x_ND.dtype, *w_EOI.shape[1:]) and x_ND.shape[0] > 0
        impl = "grouped_mm" if usable else "loop"
    if impl == "grouped_mm":
        if offsets_E is None:
            offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return _contiguous_grad(F.grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=offsets_E))
    if impl == "native":
        if not native.takes_gemm(x_ND, w_EOI):
            raise ValueError(f"grouped_linear impl='native' needs float32 CPU operands with unit inner stride, two or "
                             f"more threads and the native kernels with torch's MKL sgemm (got {x_ND.dtype} on "
                             f"{x_ND.device}, {torch.get_num_threads()} threads, native: "
                             f"{native.why_unavailable() or 'built' if native.available() else 'unavailable'})")
        counts_list = counts_list if counts_list is not None else counts_E.tolist()
        return _NativeGroupedLinear.apply(x_ND, w_EOI, list(itertools.accumulate(counts_list, initial=0)))
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
