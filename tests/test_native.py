"""moekit.ops.native: the compiled few-rows-per-expert kernels against torch's matmul, their fallbacks and errors."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moekit import MoE
from moekit.experts import MLP, SwiGLU
from moekit.experts.clamped import ClampedSwiGLU
from moekit.ops import native
from moekit.reference.loop import moe_reference
from moekit.routers import TopK

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: "
                                                               f"{native.why_unavailable()}")


def _reference(x, w_EOD, b_EO, experts, offsets, rows):
    y = torch.full((x.shape[0], w_EOD.shape[1]), float("nan"), dtype=torch.float64)
    for g, e in enumerate(experts):
        for r in rows[offsets[g]:offsets[g + 1]]:
            y[r] = x[r].double() @ w_EOD[e].double().T + (0 if b_EO is None else b_EO[e].double())
    return y


def _groups(ids):
    groups = {}
    for n, e in enumerate(ids):
        groups.setdefault(e, []).append(n)
    experts, offsets, rows = list(groups), [0], []
    for e in experts:
        rows += groups[e]
        offsets.append(len(rows))
    return experts, offsets, rows


@needs_native
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("N", [1, 2, 5, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("O,D", [(70, 37), (8, 16), (133, 64)])  # odd sizes: every vector and block remainder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_rows_equals_matmul(layout, threads, N, bias, O, D, dtype):
    """Every group's rows times its expert's weight (+ bias) equal a float64 matmul of the same (rounded) values:
    float32 to 1e-5 relative to the scale; bfloat16 to one rounding of the float32-accumulated result (2^-8
    relative); both weight layouts, unsorted and repeated expert ids, any thread count; rows keep their positions."""
    torch.manual_seed(N * 7 + O)
    E = 5
    w = torch.randn(E, O, D) if layout == "rows" else torch.randn(E, D, O).transpose(1, 2)
    b = torch.randn(E, O) if bias else None
    x = torch.randn(N, D)
    w, x = w.to(dtype), x.to(dtype)
    b = None if b is None else b.to(dtype)
    ids = torch.randint(0, E, (N,)).tolist()
    experts, offsets, rows = _groups(ids)
    y = native.grouped_rows(x, w, b, experts, offsets, rows, threads=threads)
    assert y.dtype == dtype
    ref = _reference(x, w, b, experts, offsets, rows)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=1e-5 * D ** 0.5, rtol=1e-5)
    else:  # the exact result rounded once to bfloat16 (8 significant bits), accumulation error far below that
        torch.testing.assert_close(y.double(), ref, atol=1e-4 * D ** 0.5, rtol=2 ** -8)


@needs_native
@pytest.mark.parametrize("D", [48, 77, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_rows_groups_of_one_to_seven_rows(D, dtype):
    """Groups of 1 to 7, 9 and 16 rows against float64: the few-row kernel (one weight row at a time for one input
    row, pairs of weight rows from two; with AVX-512 the first 32 of the 45 weight rows in groups of 16 whose
    results are gathered in registers, the rest one or two at a time, the odd last alone; input rows in chunks of up
    to 4; its 64-, 32- and 16-wide main loops leave different remainders at D = 48 and 77) up to 6 bfloat16 rows and
    every float32 group with AVX-512 (4 rows without), the four-row block beyond."""
    torch.manual_seed(D)
    w = torch.randn(9, 45, D).to(dtype)
    b = torch.randn(9, 45).to(dtype)
    sizes = [1, 2, 3, 4, 5, 6, 7, 9, 16]  # (9 and 16: three and four chunks of input rows)
    x = torch.randn(sum(sizes), D).to(dtype)
    experts = [2, 0, 3, 1, 6, 4, 5, 8, 7]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    rows = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(1)).tolist()
    y = native.grouped_rows(x, w, b, experts, offsets, rows, threads=2)
    ref = _reference(x, w, b, experts, offsets, rows)
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 2 ** -8)
    torch.testing.assert_close(y.double(), ref, atol=tol[0] * D ** 0.5, rtol=tol[1])


@needs_native
def test_grouped_rows_strided_inputs_and_out_rows():
    """Input rows with a row stride larger than D (a slice of a wider matrix) and an output taller than the input."""
    x_wide = torch.randn(6, 40)
    x = x_wide[:, 4:36]  # stride (40, 1)
    w = torch.randn(3, 20, 32)
    y = native.grouped_rows(x, w, None, [2, 0], [0, 2, 6], [5, 1, 0, 2, 3, 4], out_rows=9)
    assert y.shape == (9, 20)
    ref = _reference(x, w, None, [2, 0], [0, 2, 6], [5, 1, 0, 2, 3, 4])
    torch.testing.assert_close(y[:6].double(), ref, atol=1e-4, rtol=1e-5)


@needs_native
def test_grouped_rows_rejects_bad_groups():
    x, w = torch.randn(4, 8), torch.randn(3, 5, 8)
    with pytest.raises(ValueError, match="offsets"):
        native.grouped_rows(x, w, None, [0], [0, 3], [0, 1])
    with pytest.raises(ValueError, match="experts must lie"):
        native.grouped_rows(x, w, None, [3], [0, 1], [0])
    with pytest.raises(ValueError, match="row ids"):
        native.grouped_rows(x, w, None, [0], [0, 1], [4])
    with pytest.raises(ValueError, match="columns"):
        native.grouped_rows(torch.randn(4, 7), w, None, [0], [0, 1], [0])
    big = torch.randn(native.MAX_ROWS + 1, 8)
    with pytest.raises(ValueError, match="at most"):
        native.grouped_rows(big, w, None, [0], [0, native.MAX_ROWS + 1], list(range(native.MAX_ROWS + 1)))


def test_takes_only_what_it_supports():
    """float32 CPU only, unit inner stride, no autograd: anything else keeps the torch path."""
    x = torch.randn(2, 8)
    assert not native.takes_rows(x.double())
    assert not native.takes_rows(x.t().contiguous().t())  # column-major rows
    w = torch.randn(3, 5, 8)
    f32, bf16 = torch.float32, torch.bfloat16
    assert native.takes_rows(x.bfloat16()) and not native.takes_rows(x.half())
    assert native.takes_weight(w, None, f32) and native.takes_weight(w, torch.randn(3, 5), f32)
    assert native.takes_weight(w.bfloat16(), None, bf16) and not native.takes_weight(w, None, bf16)  # dtypes differ
    assert not native.takes_weight(w.double(), None, torch.float64)
    assert not native.takes_weight(w[:, :, ::2], None, f32)  # no unit inner stride
    assert not native.takes_weight(w, torch.randn(3, 5).double(), f32)
    assert native.takes_weight(torch.randn(3, 8, 5).transpose(1, 2), None, f32)  # (in, out) storage
    w.requires_grad_(True)
    assert not native.takes_weight(w, None, f32)
    with torch.no_grad():
        assert native.takes_weight(w, None, f32)
    with pytest.raises(TypeError, match="share the input's dtype"):
        native.grouped_rows(x, w.detach().bfloat16(), None, [0], [0, 1], [0])


@needs_native
@pytest.mark.parametrize("experts,fused", [
    (SwiGLU(hidden_dim=24), True), (SwiGLU(hidden_dim=24, bias=True), True), (MLP(hidden_dim=24), True),
    (SwiGLU(hidden_dim=24, activation="gelu_tanh"), True), (MLP(hidden_dim=24, activation="relu"), True),
    (MLP(hidden_dim=24, activation="gelu_table"), False),  # no native form: two projections around torch's gating
    (ClampedSwiGLU(hidden_dim=24, bias=True), True),  # gpt-oss's gating has a native form (the clamp, alpha)
    (ClampedSwiGLU(hidden_dim=24, bias=True, interleaved=True, limit=0.8, alpha=1.3), True),  # the clamp binds
], ids=["swiglu", "swiglu-bias", "mlp-gelu", "swiglu-gelu-tanh", "mlp-relu", "mlp-gelu-table", "clamped-swiglu",
        "clamped-interleaved"])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_layer_decode_on_native_kernels_equals_torch_path_and_reference(experts, fused, T, monkeypatch):
    """float32 decode (no autograd) runs on the native kernels: one fused FFN call where the gating has a native
    form, else one call per projection (every touched expert at once); equal to the torch decode path and the
    per-token reference to 1e-5."""
    torch.manual_seed(T)
    layer = MoE(16, 6, router=TopK(k=2), experts=experts).eval()
    layer.fuse_decode(False)  # the composed path: the bank's decode (the fused call: tests/test_fused_decode.py)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(T, 16)
    calls = []
    for name in ("grouped_rows", "ffn"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    with torch.no_grad():
        y_native = layer(x)
    assert calls == (["ffn"] if fused else ["grouped_rows", "grouped_rows"])
    monkeypatch.setattr(native, "available", lambda: False)
    with torch.no_grad():
        y_torch = layer(x)
    torch.testing.assert_close(y_native, y_torch, atol=1e-5, rtol=1e-5)
    if not isinstance(experts, ClampedSwiGLU):  # the loop reference knows only the plain gating
        torch.testing.assert_close(y_native, moe_reference(layer, x).detach(), atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("T", [1, 6])
def test_layer_decode_in_bfloat16_runs_natively_and_matches_float64(T, monkeypatch):
    """A bfloat16 layer decodes on the fused kernel (float32 arithmetic inside, one rounding at the end): closer to
    the float64 result than the torch bfloat16 decode path, which rounds after every step."""
    torch.manual_seed(T)
    layer = MoE(64, 6, router=TopK(k=2), experts=SwiGLU(hidden_dim=96)).eval()
    layer.fuse_decode(False)  # the composed path: the bank's decode (the fused call: tests/test_fused_decode.py)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
    layer = layer.bfloat16()
    x = torch.randn(T, 64).bfloat16()
    exact = moe_reference(copy.deepcopy(layer).double(), x.double()).detach()  # the bfloat16 model, exactly
    calls = []
    real = native.ffn
    monkeypatch.setattr(native, "ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        y_native = layer(x)
    assert calls == [1] and y_native.dtype == torch.bfloat16
    monkeypatch.setattr(native, "available", lambda: False)
    with torch.no_grad():
        y_torch = layer(x)
    err_native = (y_native.double() - exact).abs().max().item()
    err_torch = (y_torch.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert err_native <= 2 ** -7 * scale, (err_native, scale)
    assert err_native <= err_torch * 1.5 + 1e-6, (err_native, err_torch)


@needs_native
@pytest.mark.parametrize("activation", list(native.ACTIVATIONS))
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("assign", [[1, 3, 1, 0, 3, 3, 2], [1, 3, 1, 0, 3, 0, 2, 2], [2, 0]])
def test_fused_ffn_equals_torch(activation, glu, threads, assign):
    """``native.ffn`` equals the three torch steps in float64 to 1e-5 (each activation's C form included). Groups
    of unequal sizes run phase by phase over all threads; equal groups whose count the threads divide (4 groups of
    2 rows or 2 of 1 at 2 threads) run a whole expert per thread."""
    from moekit.experts.activations import ACTIVATIONS

    torch.manual_seed(3)
    E, D, F, N = 4, 40, 27, len(assign)
    w_in = torch.randn(E, 2 * F if glu else F, D) * 0.3
    b_in = torch.randn(E, w_in.shape[1])
    w2, b2 = torch.randn(E, 19, F) * 0.3, torch.randn(E, 19)
    x = torch.randn(N, D)
    experts, offsets, rows = _groups(assign)
    y = native.ffn(x, w_in, b_in, w2, b2, glu, activation, experts, offsets, rows, threads=threads)
    act = ACTIVATIONS.get(activation)
    ref = torch.empty(N, 19, dtype=torch.float64)
    for n, e in enumerate(assign):
        h = x[n].double() @ w_in[e].double().T + b_in[e].double()
        g = act(h[:F]) * h[F:] if glu else act(h)
        ref[n] = g @ w2[e].double().T + b2[e].double()
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no native form"):
        native.ffn(x, w_in, b_in, w2, b2, glu, "gelu_table", experts, offsets, rows)
    with pytest.raises(ValueError, match="do not chain"):
        native.ffn(x, w_in, b_in, w2[:, :, :-1], b2, glu, activation, experts, offsets, rows)


@needs_native
@pytest.mark.parametrize("F,Dout", [(32, 64), (75, 100), (150, 203)])
@pytest.mark.parametrize("D", [77, 256])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ffn_one_row_per_expert_in_four_streams(F, Dout, D, threads, dtype):
    """One input row per expert, the decode step of one token: with AVX-512 each run of 64 or more weight rows is
    read as four streams of a multiple of 16 rows (several input rows: test_grouped_rows_equals_matmul's 64-row work
    items), the rest 16, 2 or 1 at a time. Whole experts per thread (two
    experts, two threads: 64, 150 and 300 input-projection rows, 64, 100, 203 output rows) and 64-row work items
    (one thread) against float64, with biases; D = 77 leaves a remainder after the 32-wide steps."""
    torch.manual_seed(F + D)
    E = 3
    w_in, b_in = (torch.randn(E, 2 * F, D) * 0.2).to(dtype), torch.randn(E, 2 * F).to(dtype)
    w2, b2 = (torch.randn(E, Dout, F) * 0.2).to(dtype), torch.randn(E, Dout).to(dtype)
    x = torch.randn(2, D).to(dtype)
    assign = [2, 0]
    experts, offsets, rows = _groups(assign)
    y = native.ffn(x, w_in, b_in, w2, b2, True, "silu", experts, offsets, rows, threads=threads)
    ref = torch.empty(2, Dout, dtype=torch.float64)
    for n, e in enumerate(assign):
        h = x[n].double() @ w_in[e].double().T + b_in[e].double()
        g = torch.nn.functional.silu(h[:F]) * h[F:]
        if dtype == torch.bfloat16:  # the kernel's float32 gating output, as the output projection reads it
            g = g.float().double()
        ref[n] = g @ w2[e].double().T + b2[e].double()
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-3, 2 ** -7)
    torch.testing.assert_close(y.double(), ref, atol=tol[0] * D ** 0.5, rtol=tol[1])


@needs_native
@pytest.mark.parametrize("layout", ["rows-cols", "cols-rows", "cols-cols"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ffn_with_transposed_weights_and_clamped_interleaved_gating(layout, threads, dtype):
    """Either weight seen transposed (the (in, out) storage HF's gpt-oss keeps, "cols"), with gpt-oss's clamped,
    interleaved SwiGLU: equal to float64 of the same (rounded) weights to 1e-5 (float32) / 2^-7 of the scale (bf16)."""
    torch.manual_seed(5)
    E, D, F, Dout, N = 5, 36, 21, 30, 9
    alpha, limit = 1.702, 0.9
    up_IO = (torch.randn(E, D, 2 * F) * 0.3).to(dtype)  # (in, out) storages
    down_IO = (torch.randn(E, F, Dout) * 0.3).to(dtype)
    b_in, b2 = torch.randn(E, 2 * F).to(dtype), torch.randn(E, Dout).to(dtype)
    w_in = up_IO.transpose(1, 2) if layout.startswith("cols") else up_IO.transpose(1, 2).contiguous()
    w2 = down_IO.transpose(1, 2) if layout.endswith("cols") else down_IO.transpose(1, 2).contiguous()
    x = torch.randn(N, D).to(dtype)
    ids = [4, 0, 4, 2, 2, 2, 1, 0, 4]
    experts, offsets, rows = _groups(ids)
    y = native.ffn(x, w_in, b_in, w2, b2, True, "silu", experts, offsets, rows, threads=threads, interleaved=True,
                   clamp=(alpha, limit))
    ref = torch.empty(N, Dout, dtype=torch.float64)
    for n, e in enumerate(ids):
        h = x[n].double() @ w_in[e].double().T + b_in[e].double()
        g, u = h[0::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
        ref[n] = ((u + 1) * g * torch.sigmoid(alpha * g)) @ w2[e].double().T + b2[e].double()
    scale = ref.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(y.double(), ref, atol=tol * scale, rtol=0)
    with pytest.raises(ValueError, match="gated unit"):
        native.ffn(x, w_in[:, :F], b_in[:, :F], w2, b2, False, "silu", experts, offsets, rows, interleaved=True)
    with pytest.raises(ValueError, match="limit must be > 0"):
        native.ffn(x, w_in, b_in, w2, b2, True, "silu", experts, offsets, rows, clamp=(1.0, 0.0))
    with pytest.raises(ValueError, match="unit stride"):
        native.ffn(x, torch.randn(E, 2 * F, D, 2).to(dtype)[..., 0], None, w2, b2, True, "silu", experts, offsets,
                   rows)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_disabled_by_environment(tmp_path):
    code = ("from moekit.ops import native; print(native.available(), native.why_unavailable())")
    res = _python(code, MOEKIT_NATIVE="0", MOEKIT_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False disabled by MOEKIT_NATIVE=0"


def test_failed_build_warns_once_and_falls_back(tmp_path):
    """A compiler that fails: one RuntimeWarning naming the cause, no library left in the cache, and the layer still
    decodes (torch path) to the reference."""
    code = (
        "import warnings, torch\n"
        "from moekit import MoE\nfrom moekit.ops import native\nfrom moekit.reference.loop import moe_reference\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    layer = MoE(8, 4).eval(); x = torch.randn(2, 8)\n"
        "    with torch.no_grad(): y = layer(x); layer(x)\n"
        "msgs = [str(m.message) for m in w if 'native decode kernels unavailable' in str(m.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "torch.testing.assert_close(y, moe_reference(layer, x), atol=1e-5, rtol=1e-5)\n"
        "print(native.available())\n"
    )
    res = _python(code, CC="false", MOEKIT_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    assert not list(tmp_path.rglob("*.so"))


@needs_native
def test_build_is_cached(tmp_path):
    """The first use builds one library into the cache directory (keyed by source, compiler and CPU); a second process
    loads it without building."""
    code = "from moekit.ops import native; assert native.available(), native.why_unavailable()"
    assert _python(code, MOEKIT_CACHE_DIR=str(tmp_path)).returncode == 0
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    res = _python(code, MOEKIT_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert list(tmp_path.rglob("*.so")) == built and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@needs_native
def test_damaged_cache_entry_is_rebuilt(tmp_path):
    """A cached library that does not load (truncated by something else) is compiled again, not trusted."""
    code = "from moekit.ops import native; assert native.available(), native.why_unavailable()"
    assert _python(code, MOEKIT_CACHE_DIR=str(tmp_path)).returncode == 0
    (built,) = tmp_path.rglob("*.so")
    built.write_bytes(b"not a shared library")
    res = _python(code, MOEKIT_CACHE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert built.read_bytes() != b"not a shared library"  # rebuilt (and it loaded: available() held)


@needs_native
def test_the_other_vendors_prefetch_form_builds_and_computes_the_same(tmp_path, monkeypatch):
    """The four-stream read prefetches per CPU vendor (native_decode.c: STREAM_PF_BYTES, STREAM_PF_MASK; AMD hosts
    build with -DMOEKIT_CPU_AMD): the other vendor's build is another cache entry, passes the four-stream test, and
    gives bit for bit this build's results (a prefetch changes no arithmetic)."""
    other = "GenuineIntel" if native._cpu_vendor() == "AuthenticAMD" else "AuthenticAMD"
    torch.manual_seed(0)
    E, F, D, Dout = 3, 150, 256, 203
    w_in, b_in = torch.randn(E, 2 * F, D) * 0.2, torch.randn(E, 2 * F)
    w2, b2 = torch.randn(E, Dout, F) * 0.2, torch.randn(E, Dout)
    x = torch.randn(5, D)
    experts, offsets, rows = _groups([2, 0, 2, 1, 0])
    args = (x, w_in, b_in, w2, b2, True, "silu", experts, offsets, rows)
    mine = [native.ffn(*args, threads=t) for t in (1, 2)]
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "here"))
    native._build()
    monkeypatch.setattr(native, "_cpu_vendor", lambda: other)
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setattr(native, "_lib", native._build())
    (here,), (there,) = (list((tmp_path / d).rglob("*.so")) for d in ("here", "other"))
    assert here.name != there.name  # the vendor's flag is part of the build key
    for t, y in zip((1, 2), mine):
        assert torch.equal(native.ffn(*args, threads=t), y)
    for threads in (1, 2):
        test_fused_ffn_one_row_per_expert_in_four_streams(150, 203, 256, threads, torch.bfloat16)


@needs_native
@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc to build the AVX2-only variant")
def test_avx2_build_of_the_few_row_kernel_matches_float64(tmp_path, monkeypatch):
    """The kernels built without their AVX-512 paths (what a machine without AVX-512 runs; this one may have it):
    groups of 1 to 7 rows against float64 in float32 and bfloat16."""
    wrapper = tmp_path / "cc"
    wrapper.write_text('#!/bin/sh\nexec gcc -DMOEKIT_NO_AVX512 "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_lib", native._build())
    for dtype in (torch.float32, torch.bfloat16):
        for D in (77, 1024):
            test_grouped_rows_groups_of_one_to_seven_rows(D, dtype)
