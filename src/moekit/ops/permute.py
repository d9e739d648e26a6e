"""Row permutations whose backward is a gather, not a scatter.

Autograd's backward of ``index_select`` is an ``index_add`` (a scatter), which is serial-ish and slow on CPU. When the
index is a permutation (or a permutation of K stacked copies of the rows), the backward is just the inverse gather.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
