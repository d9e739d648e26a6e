"""Shared pieces of the routing-method tests: expert FFNs written from the weights, and a gradient harness.

Tolerances used by these tests: float64, absolute 1e-10 on inputs of unit scale (the split-loop expert impl).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOL64 = 1e-10


def swiglu_expert(bank, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert e of an ExpertBank, from its weights: W2 (silu(W1 x) * (W3 x))."""
    return bank.w2_EDF[e] @ (F.silu(bank.gate_EFD[e] @ x_D) * (bank.up_EFD[e] @ x_D))


def grads(layer, x: torch.Tensor, fn):
    """Run ``fn(layer, x)``, backprop a fixed non-uniform cotangent; return the output and every gradient."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(layer, x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    out = {"x": x.grad.clone()}
    for name, p in layer.named_parameters():
        out[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return y.detach(), out


def assert_matches_reference(layer, x, reference, tol=TOL64, fast=None):
    """Fast path (``layer(x)`` unless ``fast`` is given) against ``reference(layer, x)``: outputs and every grad."""
    y_fast, g_fast = grads(layer, x, fast or (lambda m, x: m(x)))
    y_ref, g_ref = grads(layer, x, reference)
    err = (y_fast - y_ref).abs().max().item()
    assert err <= tol, f"output: max abs error {err:.3g} > {tol}"
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        err = (g_fast[name] - g_ref[name]).abs().max().item()
        assert err <= tol, f"grad {name}: max abs error {err:.3g} > {tol}"
    return y_fast, g_fast
