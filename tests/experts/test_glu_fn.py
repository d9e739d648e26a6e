"""The fused GLU (one-buffer backward) against autograd's graph of slices, activation and product."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, SwiGLU
from moekit.experts.activations import ACTIVATIONS
from moekit.experts.glu_fn import FUSED, fused_glu
from moekit.reference.loop import moe_reference
from moekit.routers import TopK


@pytest.mark.parametrize("activation", sorted(FUSED))
def test_gradcheck_and_second_derivatives(activation):
    h = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fused_glu(t, activation), (h,))
    assert torch.autograd.gradgradcheck(lambda t: fused_glu(t, activation), (h,))


@pytest.mark.parametrize("activation", sorted(FUSED))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_equals_unfused_graph(activation, dtype, tol):
    torch.manual_seed(0)
    h = torch.randn(33, 2, 16, dtype=dtype)  # leading dims and an odd row count
    g = torch.randn(33, 2, 8, dtype=dtype)
    act = ACTIVATIONS.get(activation)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    y1 = fused_glu(h1, activation)
    y2 = act(h2[..., :8]) * h2[..., 8:]
    torch.testing.assert_close(y1, y2, atol=tol, rtol=tol)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(h1.grad, h2.grad, atol=tol, rtol=tol)


def test_bank_uses_it_in_training_and_gradients_match_the_reference():
    """A SwiGLU layer under autograd runs the fused GLU (its backward node is in the graph); its gradients equal the
    per-token reference's (float64, 1e-10)."""
    torch.manual_seed(1)
    layer = MoE(8, 4, router=TopK(k=2), experts=SwiGLU(hidden_dim=6)).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    seen, stack = set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    assert any("FusedGLU" in type(fn).__name__ for fn in seen)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    y_ref = moe_reference(layer, x)
    ref = torch.autograd.grad(y_ref, [x, *layer.parameters()], g, allow_unused=True)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-10, rtol=0)
