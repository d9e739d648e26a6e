"""The native training-path kernels (moekit.ops.native: gather_sum, combine_backward, grouped_gemm) against torch
references, the layer's forward and backward through them against the per-token loop, and their fallbacks and
errors."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.experts import SwiGLU
from moekit.ops import native
from moekit.ops.grouped import grouped_linear
from moekit.reference.loop import moe_reference
from moekit.routers import TopK

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: "
                                                               f"{native.why_unavailable()}")
needs_gemm = pytest.mark.skipif(not (native.available() and native.torch_sgemm() is not None),
                                reason="native kernels or torch's MKL sgemm_ unavailable")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _grid(K, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(K * T, generator=g)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(K * T)
    return order, inv


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 77, 700])  # 700: more than one accumulation chunk (512 columns)
@pytest.mark.parametrize("weighted", [True, False])
def test_gather_sum_matches_torch(dtype, D, weighted):
    K, T = 3, 37
    order, inv = _grid(K, T)
    y = torch.randn(K * T, D).to(dtype)
    w = torch.rand(K * T) if weighted else None
    ref = y.double()[inv].view(K, T, D)
    ref = (ref * w.double().view(K, T, 1) if weighted else ref).sum(0)
    out = native.gather_sum(y, inv, w, K, T)
    assert out.dtype == dtype and out.shape == (T, D)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: one rounding of the float32 sum
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_backward_matches_torch(dtype, weighted):
    K, T, D = 4, 29, 77
    order, _ = _grid(K, T, seed=1)
    y, g = torch.randn(K * T, D).to(dtype), torch.randn(T, D).to(dtype)
    w = torch.rand(K * T) if weighted else None
    gy, gw = native.combine_backward(g, y, order, w, K, T)
    t = order % T  # sorted row n holds pair order[n] = k*T + t
    ref_gy = g.double()[t] * (w.double()[order, None] if weighted else 1)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(gy.double(), ref_gy, atol=tol, rtol=tol)
    if weighted:
        ref_gw = torch.empty(K * T, dtype=torch.float64)
        ref_gw[order] = (g.double()[t] * y.double()).sum(-1)
        torch.testing.assert_close(gw.double(), ref_gw, atol=1e-4, rtol=1e-5)
    else:
        assert gw is None


@needs_native
def test_grid_kernels_reject_bad_indices():
    K, T, D = 2, 5, 8
    y = torch.randn(K * T, D)
    bad = torch.arange(K * T)
    bad[3] = K * T
    with pytest.raises(ValueError, match=r"row indices must lie in \[0, 10\)"):
        native.gather_sum(y, bad, None, K, T)
    with pytest.raises(ValueError, match="row indices"):
        native.combine_backward(torch.randn(T, D), y, bad, torch.rand(K * T), K, T)
    with pytest.raises(ValueError, match="num_slots \\* num_tokens"):
        native.gather_sum(y, torch.arange(K * T - 1), None, K, T)


def _loop_products(a, b, offsets, mode):
    E = len(offsets) - 1
    parts = []
    for e in range(E):
        r = slice(offsets[e], offsets[e + 1])
        if mode == "forward":
            parts.append(a[r].double() @ b[e].double().T)
        elif mode == "input_grad":
            parts.append(a[r].double() @ b[e].double())
        else:
            parts.append(a[r].double().T @ b[r].double())
    return torch.stack(parts) if mode == "weight_grad" else torch.cat(parts)


@needs_gemm
@pytest.mark.parametrize("mode", ["forward", "input_grad", "weight_grad"])
def test_grouped_gemm_matches_per_expert_products(two_threads, mode):
    # empty experts, a one-row expert, and one of 700 rows: more than the split size (256 here), so it is cut in
    # pieces (rows for the products, output rows of the weight gradient)
    counts = [3, 0, 700, 1, 10, 0]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    N, O, I = offsets[-1], 24, 40
    torch.manual_seed(0)
    if mode == "forward":
        a, b = torch.randn(N, I), torch.randn(len(counts), O, I)
    elif mode == "input_grad":
        a, b = torch.randn(N, O), torch.randn(len(counts), O, I)
    else:
        a, b = torch.randn(N, O), torch.randn(N, I)
    out = native.grouped_gemm(mode, a, b, offsets)
    torch.testing.assert_close(out.double(), _loop_products(a, b, offsets, mode), atol=1e-4, rtol=1e-5)
    if mode == "weight_grad":
        assert out[1].abs().max() == 0 and out[5].abs().max() == 0  # no rows: a zero gradient, not garbage
    if mode != "weight_grad":  # the same weights stored (E, in, out) and seen transposed (gpt-oss, Llama 4)
        b_t = b.transpose(1, 2).contiguous().transpose(1, 2)
        assert native.weights_transposed(b_t) and native.takes_gemm(a, b_t)
        torch.testing.assert_close(native.grouped_gemm(mode, a, b_t, offsets).double(),
                                   _loop_products(a, b, offsets, mode), atol=1e-4, rtol=1e-5)


@needs_gemm
def test_grouped_gemm_errors(two_threads):
    a, w = torch.randn(10, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="offsets must run from 0 to 10"):
        native.grouped_gemm("forward", a, w, [0, 4, 9])
    with pytest.raises(ValueError, match="does not chain"):
        native.grouped_gemm("forward", a, torch.randn(2, 4, 7), [0, 4, 10])
    with pytest.raises(ValueError, match="unknown mode"):
        native.grouped_gemm("backward", a, w, [0, 4, 10])
    assert not native.takes_gemm(a.bfloat16(), w.bfloat16())  # float32 only
    assert not native.takes_gemm(a, w[:, :, ::2])  # no unit stride along either weight dim
    with pytest.raises(ValueError, match="no unit stride"):
        native.grouped_gemm("forward", a[:, :4], w[:, :, ::2], [0, 4, 10])
    torch.set_num_threads(1)
    assert not native.takes_gemm(a, w)  # one thread: torch's grouped_mm is as fast


@needs_gemm
def test_grouped_linear_native_forward_backward_matches_grouped_mm(two_threads):
    torch.manual_seed(0)
    counts_E = torch.tensor([5, 0, 300, 17])
    x = torch.randn(int(counts_E.sum()), 32, requires_grad=True)
    w = torch.randn(4, 48, 32, requires_grad=True)
    g = torch.randn(x.shape[0], 48)
    grads = {}
    for impl in ("native", "grouped_mm"):
        y = grouped_linear(x, w, counts_E, impl=impl)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        grads[impl] = (y, gx, gw)
    for a, b in zip(grads["native"], grads["grouped_mm"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a parameter stored (E, in, out), used transposed (the swapped gpt-oss bank): native keeps the storage layout
    w_IO = w.detach().transpose(1, 2).contiguous().requires_grad_()
    y = grouped_linear(x, w_IO.transpose(1, 2), counts_E, impl="native")
    gx, gw = torch.autograd.grad(y, (x, w_IO), g)
    torch.testing.assert_close(y, grads["grouped_mm"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, grads["grouped_mm"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, grads["grouped_mm"][2].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.set_num_threads(1)
    with pytest.raises(ValueError, match="impl='native' needs"):
        grouped_linear(x, w, counts_E, impl="native")


def _layer(E=8, k=2, D=32, F=24, seed=0):
    torch.manual_seed(seed)
    return MoE(D, E, router=TopK(k=k), experts=SwiGLU(hidden_dim=F))


@needs_gemm
@pytest.mark.parametrize("E,k", [(8, 2), (16, 4)])
def test_layer_training_through_native_kernels_matches_reference(two_threads, monkeypatch, E, k):
    """Forward and backward of a top-k layer on CPU float32 take the native kernels (counted) and equal the
    per-token loop: outputs, input, expert-weight and router-weight gradients."""
    calls = {"gather_sum": 0, "combine_backward": 0, "grouped_gemm": 0}
    for name in calls:
        real = getattr(native, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(native, name, counted)
    layer = _layer(E, k)
    x = torch.randn(2, 40, 32, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    params = [x, layer.experts.w13_E2FD, layer.experts.w2_EDF, layer.router.gate.weight]
    got = torch.autograd.grad(y, params, g)
    # gather_sum: the combine's forward and the dispatch gather's backward; grouped_gemm: 2 forward products, and
    # 2 input + 2 weight gradients
    assert calls == {"gather_sum": 2, "combine_backward": 1, "grouped_gemm": 6}
    ref = moe_reference(layer, x)
    want = torch.autograd.grad(ref, params, g)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@needs_gemm
def test_layer_native_equals_torch_path(two_threads, monkeypatch):
    """The same layer with the native kernels and with torch's ops (native turned off for the call)."""
    layer = _layer(16, 4)
    x = torch.randn(64, 32, requires_grad=True)
    params = [x, *layer.parameters()]
    out = {}
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(native, "takes_grid", lambda *a: False)
            monkeypatch.setattr(native, "takes_gemm", lambda *a: False)
        y = layer(x)
        out[use_native] = (y, *torch.autograd.grad(y.square().sum(), params))
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@needs_gemm
def test_double_backward_through_native_functions(two_threads, monkeypatch):
    """create_graph=True: the backward of both native Functions builds a graph (torch's differentiable form), so a
    gradient penalty works and equals the torch path's."""
    layer = _layer(8, 2)
    x = torch.randn(24, 32, requires_grad=True)

    def penalty():
        y = layer(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), layer.experts.w2_EDF)[0]

    got = penalty()
    monkeypatch.setattr(native, "takes_grid", lambda *a: False)
    monkeypatch.setattr(native, "takes_gemm", lambda *a: False)
    torch.testing.assert_close(got, penalty(), atol=1e-4, rtol=1e-4)


@needs_native
def test_bf16_layer_training_combine_matches_float32_math(two_threads):
    """bfloat16: the combine runs natively (float32 accumulation, one rounding); forward and backward stay close to
    the float32 layer's."""
    layer = _layer(8, 2)
    x = torch.randn(48, 32)
    y32 = layer(x.requires_grad_(True))
    g32 = torch.autograd.grad(y32.sum(), x)[0]
    lb = _layer(8, 2).to(torch.bfloat16)
    lb.load_state_dict({k: v.bfloat16() for k, v in layer.state_dict().items()})
    xb = x.detach().bfloat16().requires_grad_(True)
    yb = lb(xb)
    gb = torch.autograd.grad(yb.sum(), xb)[0]
    torch.testing.assert_close(yb.float(), y32, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(gb.float(), g32, atol=3e-2, rtol=3e-2)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F", [256, 13])  # 13: the 8-wide loop and the scalar tail
def test_swiglu_kernel_matches_float64(dtype, F):
    torch.manual_seed(0)
    h = (torch.randn(40, 2 * F) * 4).to(dtype)
    h[0, 0], h[0, 1], h[1, 0] = -100.0, 100.0, 0.0  # the exp's clamps and zero
    hd = h.double().requires_grad_(True)
    ref = torch.nn.functional.silu(hd[:, :F]) * hd[:, F:]
    g = torch.randn(40, F).to(dtype)
    (gref,) = torch.autograd.grad(ref, hd, g.double())
    out, gh = native.swiglu(h), native.swiglu_backward(g, h)
    assert out.dtype == gh.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(gh.double(), gref, **tol)


@needs_native
def test_fused_glu_takes_native_swiglu_and_keeps_torch_for_other_activations(monkeypatch):
    from moekit.experts.glu_fn import fused_glu

    calls = []
    real = native.swiglu_backward
    monkeypatch.setattr(native, "swiglu_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = torch.randn(10, 16, requires_grad=True)
    for act in ("silu", "gelu"):
        y = fused_glu(h, act)
        (g,) = torch.autograd.grad(y.sum(), h)
        ref_act = torch.nn.functional.silu if act == "silu" else torch.nn.functional.gelu
        hh = h.detach().requires_grad_(True)
        (gr,) = torch.autograd.grad((ref_act(hh[:, :8]) * hh[:, 8:]).sum(), hh)
        torch.testing.assert_close(g, gr, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1  # silu natively, gelu through aten's kernels


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("F", [256, 13])
@pytest.mark.parametrize("interleaved", [False, True])
def test_clamped_interleaved_swiglu_kernel_matches_float64(dtype, F, interleaved):
    """gpt-oss's form (clamped, gate/up interleaved) and plain SwiGLU on interleaved rows, against float64 torch;
    values on and beyond both clamp bounds (the clamp's gradient passes on the bound, as torch's)."""
    from moekit.experts.clamped import clamped_swiglu

    torch.manual_seed(1)
    h = (torch.randn(40, 2 * F) * 6).to(dtype)
    h[0, :8] = torch.tensor([7.0, 7.0, 9.0, -7.0, -9.0, 9.0, 3.0, -12.0])  # gate/up at and past +-limit
    hd = h.double().requires_grad_(True)
    g, u = (hd[:, 0::2], hd[:, 1::2]) if interleaved else (hd[:, :F], hd[:, F:])
    grad = torch.randn(40, F).to(dtype)
    for clamp in (None, (1.702, 7.0)):
        ref = clamped_swiglu(g, u, *clamp) if clamp else torch.nn.functional.silu(g) * u
        (gref,) = torch.autograd.grad(ref, hd, grad.double())
        out = native.swiglu(h, interleaved=interleaved, clamp=clamp)
        gh = native.swiglu_backward(grad, h, interleaved=interleaved, clamp=clamp)
        scale = ref.abs().max().item()
        tol = dict(atol=1e-5 * scale, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3 * scale, rtol=8e-3)
        torch.testing.assert_close(out.double(), ref, **tol)
        torch.testing.assert_close(gh.double(), gref, **tol)
    with pytest.raises(ValueError, match="limit must be > 0"):
        native.swiglu(h, clamp=(1.0, 0.0))


@needs_native
def test_clamped_bank_and_gpt_oss_experts_take_native_glu(two_threads, monkeypatch):
    """A gpt-oss-like clamped, interleaved bank trains through the native GLU (counted) and equals the per-token
    loop; with the kernels refused it takes the torch form, with the same numbers."""
    from moekit.experts.clamped import ClampedSwiGLU

    calls = []
    real = native.swiglu_backward
    monkeypatch.setattr(native, "swiglu_backward", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    layer = MoE(32, 8, router=TopK(k=2), experts=ClampedSwiGLU(hidden_dim=24, interleaved=True, limit=1.5))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)  # pre-activations past the clamp limit
    x = torch.randn(2, 40, 32, requires_grad=True)
    params = [x, layer.experts.w13_E2FD, layer.experts.b13_E2F, layer.experts.w2_EDF]
    g = torch.randn(2, 40, 32)
    got = torch.autograd.grad(layer(x), params, g)
    assert calls == [{"interleaved": True, "clamp": (1.702, 1.5)}]
    ref = moe_reference(layer, x)
    for a, b in zip(got, torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(native, "takes_grid", lambda *a: False)
    for a, b in zip(got, torch.autograd.grad(layer(x), params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
