"""The layer under ``torch.compile`` (fullgraph, dynamic token counts), ``torch.export`` (float32 and bfloat16) and
on the meta device. Each compile costs tens of seconds on a shared CPU: few compiles, tiny shapes, marked slow."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.experts import SwiGLU

D, E, FH = 16, 4, 32


def _layer(**kw) -> MoE:
    torch.manual_seed(0)
    return MoE(D, E, experts=SwiGLU(hidden_dim=FH), **kw)


def test_meta_build_then_to_empty_and_reset_parameters():
    """Built on meta (a forward there gives shapes), then materialised and initialised like a CPU build."""
    with torch.device("meta"):
        layer = _layer(shared_experts=SwiGLU(hidden_dim=8))
        y = layer(torch.randn(5, D))
    assert y.shape == (5, D) and y.device.type == "meta"
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    ref = _layer(shared_experts=SwiGLU(hidden_dim=8))
    for (n, a), (_, b) in zip(layer.named_parameters(), ref.named_parameters()):
        assert a.shape == b.shape and torch.isfinite(a).all(), n
        # same distributions as a fresh build: same bounds of the uniform inits, zeros stay zeros
        a, b = a.detach(), b.detach()
        assert float(a.abs().max()) <= float(b.abs().max()) * 1.5 + 1e-6 and (b.abs().max() > 0) == (a.abs().max() > 0), n
    for n, buf in layer.named_buffers():
        assert torch.equal(buf, dict(ref.named_buffers())[n]), n
    x = torch.randn(7, D)
    assert torch.isfinite(layer(x)).all()


@pytest.mark.slow
def test_compile_fullgraph_dynamic_tokens_fwd_bwd():
    """fullgraph=True, dynamic=True: outputs and gradients equal eager (float32, 1e-6) at several token counts."""
    layer = _layer()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (5, 11):
        x = torch.randn(T, D)
        xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yc = compiled(xc)
        yc.square().sum().backward()
        gw = layer.experts.w13_E2FD.grad.clone()
        layer.zero_grad()
        ye = layer(xe)
        ye.square().sum().backward()
        torch.testing.assert_close(yc, ye, atol=1e-6, rtol=0)
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(gw, layer.experts.w13_E2FD.grad, atol=1e-6, rtol=0)
        layer.zero_grad()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_dynamic_tokens(dtype):
    """torch.export with a dynamic token count; the exported program equals eager at other token counts."""
    layer = _layer().to(dtype).eval()
    T = torch.export.Dim("T", min=2, max=1024)
    ep = torch.export.export(layer, (torch.randn(6, D, dtype=dtype),), dynamic_shapes=({0: T},))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for n in (3, 17):
        x = torch.randn(n, D, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), layer(x), atol=tol, rtol=0)
