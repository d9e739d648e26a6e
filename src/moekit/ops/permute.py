"""Row permutations whose backward is a gather, not a scatter, and the combine of a top-k grid in one pass.

Autograd's backward of ``index_select`` is an ``index_add`` (a scatter), which is serial-ish and slow on CPU. When the
index is a permutation (or a permutation of K stacked copies of the rows), the backward is just the inverse gather.

On CPU (float32 / bfloat16, where moekit's native kernels are built) the steps around the experts also run as single
passes over the (K*T, D) rows (:func:`moekit.ops.native.gather_sum`, :func:`~moekit.ops.native.combine_backward`):
the combine ``out[t] = sum_k w[k, t] * y[inv[k*T + t]]`` and its backward, and the backward of the dispatch's gather
of K copies. Elsewhere (another device or dtype, ``torch.compile`` tracing, a backward that builds a graph) the same
steps are torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native


class _GatherReplicated(torch.autograd.Function):
    """``out[n] = x[order[n] % T]``: rows of K stacked copies of ``x_TD`` in the order ``order`` (a permutation of
    range(K*T)). Backward: ``grad_x = grad_out[inv_order].view(K, T, D).sum(0)``."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_N: Tensor, inv_order_N: Tensor, num_slots: int) -> Tensor:
        ctx.save_for_backward(inv_order_N)
        ctx.num_slots, ctx.num_tokens = num_slots, x_TD.shape[0]
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (inv_order_N,) = ctx.saved_tensors
        K = ctx.num_slots
        if not torch.is_grad_enabled() and native.takes_grid(grad_ND):
            return native.gather_sum(grad_ND, inv_order_N, None, K, ctx.num_tokens), None, None, None
        grad = grad_ND.index_select(0, inv_order_N)
        return grad.view(K, ctx.num_tokens, grad.shape[-1]).sum(0), None, None, None  # explicit T: T=0 works


class _Permute(torch.autograd.Function):
    """``out = src[perm]`` for a permutation; backward ``grad_src = grad_out[inv_perm]``."""

    @staticmethod
    def forward(ctx, src: Tensor, perm: Tensor, inv_perm: Tensor) -> Tensor:
        ctx.save_for_backward(inv_perm)
        return src.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inv_perm,) = ctx.saved_tensors
        return grad.index_select(0, inv_perm), None, None


def gather_replicated(x_TD: Tensor, token_N: Tensor, inv_order_N: Tensor, num_slots: int) -> Tensor:
    if not (torch.is_grad_enabled() and x_TD.requires_grad):  # nothing to differentiate: skip the Function
        return x_TD.index_select(0, token_N)
    return _GatherReplicated.apply(x_TD, token_N, inv_order_N, num_slots)


def permute_rows(src: Tensor, perm: Tensor, inv_perm: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and src.requires_grad):
        return src.index_select(0, perm)
    return _Permute.apply(src, perm, inv_perm)


class _CombineGrid(torch.autograd.Function):
    """``out[t] = sum_k w[k*T + t] * y[inv[k*T + t]]`` with the native one-pass forward and backward; ``w`` None: an
    unweighted sum. ``w`` is float32 (the kernels' weight type)."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, w_N: Tensor | None, order_N: Tensor, inv_order_N: Tensor, num_slots: int,
                num_tokens: int) -> Tensor:
        ctx.save_for_backward(y_ND, w_N, order_N)
        ctx.num_slots, ctx.num_tokens = num_slots, num_tokens
        return native.gather_sum(y_ND, inv_order_N, w_N, num_slots, num_tokens)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        y_ND, w_N, order_N = ctx.saved_tensors
        K, T = ctx.num_slots, ctx.num_tokens
        g_TD = g_TD.contiguous()  # (a gradient from .sum() is stride-0)
        if torch.is_grad_enabled() or not native.takes_grid(g_TD, y_ND):  # create_graph=True: differentiable ops
            g_ND = g_TD.index_select(0, order_N % T)
            if w_N is None:
                return g_ND, None, None, None, None, None
            w_sorted = w_N.index_select(0, order_N)
            gw = torch.empty_like(w_N).index_copy(0, order_N, (g_ND.to(w_N.dtype) * y_ND.to(w_N.dtype)).sum(-1))
            return (g_ND * w_sorted.unsqueeze(-1)).to(y_ND.dtype), gw, None, None, None, None
        gy, gw = native.combine_backward(g_TD, y_ND, order_N, w_N, K, T)
        return gy, gw if ctx.needs_input_grad[1] else None, None, None, None, None


def combine_grid(y_ND: Tensor, w_N: Tensor | None, order_N: Tensor, inv_order_N: Tensor, num_slots: int,
                 num_tokens: int) -> Tensor | None:
    """The grid combine in one native pass (forward and backward), or None where :func:`native.takes_grid` says the
    kernels do not apply (the caller then uses torch ops). ``y_ND``: the experts' outputs in sorted order;
    ``w_N``: float32 weights in grid order (None: unweighted); ``order_N`` / ``inv_order_N``: sorted row -> grid
    pair and back."""
    if not native.takes_grid(y_ND) or (w_N is not None and w_N.dtype != torch.float32):
        return None
    if not (torch.is_grad_enabled() and (y_ND.requires_grad or (w_N is not None and w_N.requires_grad))):
        return native.gather_sum(y_ND, inv_order_N, w_N, num_slots, num_tokens)
    return _CombineGrid.apply(y_ND, w_N, order_N, inv_order_N, num_slots, num_tokens)
