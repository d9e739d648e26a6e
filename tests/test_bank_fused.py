"""The fused gate/up bank (``w13_E2FD``) computes exactly what the two-weight layout (``w1_EFD`` + ``w3_EFD``)
computed, and state dicts of the old layout still load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE
from moekit.experts import MLP, SwiGLU
from moekit.ops.grouped import grouped_linear
from moekit.routers import TopK

D, E, FH = 8, 4, 16


def _old_forward(bank, w1, w3, w2, b1, b3, b2, x_ND, counts_E, impl):
    """The previous ExpertBank.forward: two grouped matmuls for gate and up."""
    expert_N = torch.repeat_interleave(torch.arange(E), counts_E)

    def proj(x, w, b):
        y = grouped_linear(x, w, counts_E, impl=impl)
        return y if b is None else y + b[expert_N]

    h = bank.act(proj(x_ND, w1, b1)) * proj(x_ND, w3, b3)
    return proj(h, w2, b2)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,impl,tol", [(torch.float64, "loop", 1e-12), (torch.float32, "grouped_mm", 1e-5)])
def test_fused_bank_equals_two_weight_layout(bias, dtype, impl, tol):
    """Outputs and every gradient (float64 <= 1e-12; float32 grouped_mm <= 1e-5) when w13 = cat(w1, w3)."""
    torch.manual_seed(0)
    bank = SwiGLU(hidden_dim=FH, bias=bias, impl=impl).build(D, E).to(dtype)
    with torch.no_grad():
        if bias:
            bank.b13_E2F.normal_()
            bank.b2_ED.normal_()
    w13 = bank.w13_E2FD.detach()
    w1 = w13[:, :FH].clone().requires_grad_(True)
    w3 = w13[:, FH:].clone().requires_grad_(True)
    w2 = bank.w2_EDF.detach().clone().requires_grad_(True)
    b1 = b3 = b2 = None
    if bias:
        b1 = bank.b13_E2F.detach()[:, :FH].clone().requires_grad_(True)
        b3 = bank.b13_E2F.detach()[:, FH:].clone().requires_grad_(True)
        b2 = bank.b2_ED.detach().clone().requires_grad_(True)
    counts_E = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts_E.sum()), D, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(x.shape[0], D, dtype=dtype)

    y_new = bank(x1, counts_E)
    y_old = _old_forward(bank, w1, w3, w2, b1, b3, b2, x2, counts_E, impl)
    torch.testing.assert_close(y_new, y_old, atol=tol, rtol=0)
    (y_new * g).sum().backward()
    (y_old * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=tol, rtol=0)
    torch.testing.assert_close(bank.w13_E2FD.grad, torch.cat([w1.grad, w3.grad], 1), atol=tol, rtol=0)
    torch.testing.assert_close(bank.w2_EDF.grad, w2.grad, atol=tol, rtol=0)
    if bias:
        torch.testing.assert_close(bank.b13_E2F.grad, torch.cat([b1.grad, b3.grad], 1), atol=tol, rtol=0)
        torch.testing.assert_close(bank.b2_ED.grad, b2.grad, atol=tol, rtol=0)


def test_fused_bank_runs_one_matmul_for_gate_and_up():
    """Two grouped matmuls per call (gate+up, down), not three."""
    bank = SwiGLU(hidden_dim=FH, impl="grouped_mm").build(D, E)
    counts_E = torch.tensor([2, 2, 2, 2])
    calls = []
    orig = F.grouped_mm
    try:
        F.grouped_mm = lambda *a, **k: calls.append(a[1].shape) or orig(*a, **k)
        bank(torch.randn(8, D), counts_E)
    finally:
        F.grouped_mm = orig
    assert calls == [torch.Size([E, D, 2 * FH]), torch.Size([E, FH, D])]


def _old_state_dict(layer: MoE) -> dict[str, torch.Tensor]:
    """What the previous code saved: gate and up as two (E, F, D) weights, biases likewise."""
    sd = {}
    for k, v in layer.state_dict().items():
        if k.endswith("w13_E2FD"):
            sd[k.replace("w13_E2FD", "w1_EFD")], sd[k.replace("w13_E2FD", "w3_EFD")] = v[:, :FH].clone(), v[:, FH:].clone()
        elif k.endswith("b13_E2F"):
            sd[k.replace("b13_E2F", "b1_EF")], sd[k.replace("b13_E2F", "b3_EF")] = v[:, :FH].clone(), v[:, FH:].clone()
        else:
            sd[k] = v.clone()
    return sd


@pytest.mark.parametrize("bias", [False, True])
def test_old_two_weight_checkpoint_loads(tmp_path, bias):
    """A state dict of the old layout (through a safetensors file) loads strictly and gives the same outputs."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1)
    kw = dict(router=TopK(k=2), experts=SwiGLU(hidden_dim=FH, bias=bias), shared_experts=SwiGLU(hidden_dim=4))
    src = MoE(D, E, **kw)
    if bias:
        with torch.no_grad():
            src.experts.b13_E2F.normal_()
    old = _old_state_dict(src)
    assert "experts.w1_EFD" in old and "experts.w3_EFD" in old and "experts.w13_E2FD" not in old
    save_file(old, tmp_path / "old.safetensors")
    dst = MoE(D, E, **kw)
    dst.load_state_dict(load_file(tmp_path / "old.safetensors"), strict=True)
    assert torch.equal(dst.experts.w13_E2FD, src.experts.w13_E2FD)
    if bias:
        assert torch.equal(dst.experts.b13_E2F, src.experts.b13_E2F)
    x = torch.randn(5, D)
    assert torch.equal(dst(x), src(x))
    # the new layout round-trips under its own names
    assert set(dst.state_dict()) == set(src.state_dict())


def test_half_an_old_checkpoint_is_a_clear_error():
    """w1 without w3 is not converted: strict loading names the missing fused weight."""
    layer = MoE(D, E, experts=SwiGLU(hidden_dim=FH))
    old = _old_state_dict(layer)
    del old["experts.w3_EFD"]
    with pytest.raises(RuntimeError, match="w13_E2FD"):
        layer.load_state_dict(old)


def test_mlp_bank_keeps_one_input_weight():
    """Non-GLU experts: ``w1_EFD`` (E, F, D) and ``b1_EF``; the views agree with the parameters."""
    bank = MLP(hidden_dim=FH).build(D, E)
    names = {n for n, _ in bank.named_parameters()}
    assert names == {"w1_EFD", "b1_EF", "w2_EDF", "b2_ED"}
    assert bank.gate_EFD is bank.w1_EFD and bank.up_EFD is None and bank.up_bias_EF is None
    glu = SwiGLU(hidden_dim=FH, bias=True).build(D, E)
    assert {n for n, _ in glu.named_parameters()} == {"w13_E2FD", "b13_E2F", "w2_EDF", "b2_ED"}
    assert glu.gate_EFD.data_ptr() == glu.w13_E2FD.data_ptr() and glu.up_EFD.shape == (E, FH, D)
    x = torch.randn(3, D)
    e = 2
    ref = glu.w2_EDF[e] @ (F.silu(glu.gate_EFD[e] @ x.T + glu.gate_bias_EF[e, :, None])
                           * (glu.up_EFD[e] @ x.T + glu.up_bias_EF[e, :, None]))
    torch.testing.assert_close(glu.expert_forward(e, x), ref.T + glu.b2_ED[e], atol=1e-6, rtol=0)
