"""``act(h[:, :F]) * h[:, F:]`` on the fused gate/up output, with a backward that writes both halves of the input
gradient into one buffer.

Autograd's own graph for the two slices, the activation and the product allocates a zero (N, 2F) tensor for each
slice's gradient, copies the half in and adds the two: five full passes over an (N, 2F) buffer per backward, 4-6% of
a fine-grained layer's forward+backward on CPU (docs/performance.md). Here the backward computes
``d_up = grad * act(gate)`` and ``d_gate = act'(gate) * grad * up`` straight into the halves of one ``empty`` buffer,
with aten's own activation backward kernels, so the numbers are those of the unfused graph. A backward that builds
a graph (``create_graph=True``) takes autograd's own formula instead, so second derivatives work as before.

SwiGLU on CPU float32 / bfloat16 rows takes moekit's native kernel (:func:`moekit.ops.native.swiglu`) instead: one
pass forward, saving only ``h``, and one pass backward that recomputes the sigmoid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import native

# activation name -> (forward, backward(grad, input) -> grad_input), aten's kernels
_KERNELS = {
    "silu": (torch.nn.functional.silu, torch.ops.aten.silu_backward),
    "swish": (torch.nn.functional.silu, torch.ops.aten.silu_backward),
    "gelu": (torch.nn.functional.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x)),
    "gelu_tanh": (lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                  lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh")),
}


class _NativeGLU(torch.autograd.Function):
    """SwiGLU (any :func:`moekit.ops.native.swiglu` form) with the native kernels both ways; ``h`` is all it keeps."""

    @staticmethod
    def forward(ctx, h_N2F: Tensor, interleaved: bool, clamp: tuple[float, float] | None) -> Tensor:
        ctx.form = (interleaved, clamp)
        ctx.save_for_backward(h_N2F)
        return native.swiglu(h_N2F, interleaved=interleaved, clamp=clamp)

    @staticmethod
    def backward(ctx, grad_NF: Tensor) -> tuple[Tensor, None, None]:
        (h_N2F,) = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        interleaved, clamp = ctx.form
        if not torch.is_grad_enabled() and native.takes_grid(grad_NF, h_N2F):
            return native.swiglu_backward(grad_NF, h_N2F, interleaved=interleaved, clamp=clamp), None, None
        # create_graph=True (or a gradient the kernel does not take): autograd's graph of the torch form
        y = torch_swiglu(h_N2F, interleaved, clamp)
        return torch.autograd.grad(y, h_N2F, grad_NF, create_graph=torch.is_grad_enabled())[0], None, None


def torch_swiglu(h_N2F: Tensor, interleaved: bool = False, clamp: tuple[float, float] | None = None) -> Tensor:
    """The torch form of :func:`moekit.ops.native.swiglu`: ``silu(gate) * up``, or gpt-oss's clamped form."""
    F = h_N2F.shape[-1] // 2
    g, u = (h_N2F[..., 0::2], h_N2F[..., 1::2]) if interleaved else (h_N2F[..., :F], h_N2F[..., F:])
    return torch.nn.functional.silu(g) * u if clamp is None else clamped_swiglu(g, u, *clamp)


def clamped_swiglu(g: Tensor, u: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's gating ``(clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')`` with ``g' = clamp(g,
    max=limit)``."""
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def native_swiglu(h_N2F: Tensor, interleaved: bool = False, clamp: tuple[float, float] | None = None) -> Tensor | None:
    """SwiGLU through the native kernels (forward and backward) where they take ``h`` (CPU float32 / bfloat16 rows
    with unit inner stride, not under ``torch.compile``); None otherwise, for the caller's torch form."""
    if h_N2F.dim() != 2 or torch.compiler.is_compiling() or not native.takes_grid(h_N2F):
        return None
    return _NativeGLU.apply(h_N2F, interleaved, clamp)


class _FusedGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_N2F: Tensor, activation: str) -> Tensor:
        act, _ = _KERNELS[activation]
        F = h_N2F.shape[-1] // 2
        gate, up = h_N2F[..., :F], h_N2F[..., F:]
        a = act(gate)
        ctx.save_for_backward(h_N2F, a)
        ctx.activation = activation
        return a * up

    @staticmethod
    def backward(ctx, grad_NF: Tensor) -> tuple[Tensor, None]:
        h_N2F, a = ctx.saved_tensors
        act, act_backward = _KERNELS[ctx.activation]
        F = h_N2F.shape[-1] // 2
        gate, up = h_N2F[..., :F], h_N2F[..., F:]
        if torch.is_grad_enabled():  # create_graph=True: autograd's own graph, so higher derivatives exist
            y = act(gate) * up
            return torch.autograd.grad(y, h_N2F, grad_NF, create_graph=True)[0], None
        grad_N2F = torch.empty_like(h_N2F)
        torch.mul(grad_NF, a, out=grad_N2F[..., F:])
        grad_N2F[..., :F] = act_backward(grad_NF * up, gate)
        return grad_N2F, None


def fused_glu(h_N2F: Tensor, activation: str) -> Tensor:
    """``act(h[..., :F]) * h[..., F:]`` with the one-buffer backward (``activation`` in :data:`FUSED`); SwiGLU takes
    the native kernels where they apply (:func:`native_swiglu`)."""
    if activation in _NATIVE and (y := native_swiglu(h_N2F)) is not None:
        return y
    return _FusedGLU.apply(h_N2F, activation)


FUSED = frozenset(_KERNELS)  # activations with a fused GLU backward
_NATIVE = frozenset({"silu", "swish"})  # ... and with a one-pass native kernel (CPU float32 / bfloat16)
