"""moekit as a transformers experts implementation: the experts function against a per-token loop and against HF's
eager forward (float64 / float32 / bfloat16, forward and backward), registration, and the errors it raises."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moekit.convert  # noqa: E402,F401  (registers "moekit")
from moekit.convert import hf_experts, hf_sweep  # noqa: E402
from moekit.convert.hf_experts import moekit_experts_forward  # noqa: E402

T, K = 12, 2


def _experts(arch: str, cls_name: str, dtype: torch.dtype = torch.float64, **over) -> torch.nn.Module:
    """One decorated experts module of ``arch`` built from the sweep's tiny config, with random weights."""
    mod = hf_sweep._modeling(arch)
    model_cls = hf_sweep._pick_model_class(mod)
    cfg = hf_sweep.tiny_config(arch, model_cls.config_class)
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg._experts_implementation = "eager"
    m = getattr(mod, cls_name)(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.to(dtype)


def _routing(E: int, D: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx[0] = idx[1]  # a repeated routing row; some experts get no token at all when E is large
    w = torch.rand(T, K, generator=g).to(dtype)
    return x, idx, w


def _loop_reference(m, x, idx, w) -> torch.Tensor:
    """sum_k w[t,k] * expert_{idx[t,k]}(x[t]), one (token, choice) at a time, straight from the weights."""
    up = m.gate_up_proj if m.has_gate else m.up_proj
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            wu = up[e].T if m.is_transposed else up[e]
            wd = m.down_proj[e].T if m.is_transposed else m.down_proj[e]
            h = wu @ x[t]
            if m.has_bias:
                h = h + (m.gate_up_proj_bias if m.has_gate else m.up_proj_bias)[e]
            if not m.has_gate:
                h = m.act_fn(h)
            elif hf_experts._uses_default_gate(m):
                gate, u = (h.chunk(2) if m.is_concatenated else (h[::2], h[1::2]))
                h = m.act_fn(gate) * u
            else:
                h = m._apply_gate(h[None])[0]
            y = wd @ h
            if m.has_bias:
                y = y + m.down_proj_bias[e]
            if m.has_post_expert_norm:
                y = m.post_expert_norm(y[None])[0]
            out[t] = out[t] + w[t, j] * y
    return out


CASES = [  # (arch, experts class): default gate, interleaved clamped SwiGLU + transposed + bias, no gate, post norm
    ("qwen3_moe", "Qwen3MoeExperts"),
    ("gpt_oss", "GptOssExperts"),
    ("nemotron_h", "NemotronHExperts"),
    ("muse_spark", "MuseSparkExperts"),
    ("deepseek_v4", "DeepseekV4Experts"),
]


def _dim(m) -> int:
    up = m.gate_up_proj if m.has_gate else m.up_proj
    return up.shape[1] if m.is_transposed else up.shape[2]


@pytest.mark.parametrize("arch,cls_name", CASES)
def test_float64_matches_loop_and_eager_with_grads(arch, cls_name):
    m = _experts(arch, cls_name)
    E = (m.gate_up_proj if m.has_gate else m.up_proj).shape[0]
    x, idx, w = _routing(E, _dim(m), torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    got = moekit_experts_forward(m, x, idx, w)
    ref = _loop_reference(m, x, idx, w)
    assert (got - ref).abs().max() <= 1e-10
    m.config._experts_implementation = "eager"
    eager = m(x, idx, w)
    assert (got - eager).abs().max() <= 1e-10
    probe = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(3))
    params = [x, w] + [p for p in m.parameters()]
    g_got = torch.autograd.grad((got * probe).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * probe).sum(), params, allow_unused=True)
    # MuseSpark's post-expert norm computes in float32 even for float64 input: its weight gradient, a sum over pairs
    # in a different order, is float32-exact only
    tol = 1e-5 if arch == "muse_spark" else 1e-10
    for a, b in zip(g_got, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("arch,cls_name", CASES[:2])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_float32_bfloat16_match_eager(arch, cls_name, dtype, tol):
    m = _experts(arch, cls_name, dtype=dtype)
    E = m.gate_up_proj.shape[0]
    x, idx, w = _routing(E, _dim(m), dtype, seed=1)
    got = moekit_experts_forward(m, x, idx, w)
    assert got.dtype == dtype
    m.config._experts_implementation = "eager"
    ref = m(x, idx, w)
    scale = max(1.0, float(ref.detach().abs().max()))
    assert float((got.double() - ref.double()).abs().max()) <= tol * scale


def test_reads_only_the_documented_attributes():
    """The offload contract: a plain namespace holding the documented attributes runs, and gives the same output."""
    m = _experts("gpt_oss", "GptOssExperts")
    E = m.gate_up_proj.shape[0]
    proxy = types.SimpleNamespace(
        has_gate=m.has_gate, is_transposed=m.is_transposed, is_concatenated=m.is_concatenated, has_bias=m.has_bias,
        has_post_expert_norm=m.has_post_expert_norm, gate_up_proj=m.gate_up_proj, down_proj=m.down_proj,
        gate_up_proj_bias=m.gate_up_proj_bias, down_proj_bias=m.down_proj_bias, _apply_gate=m._apply_gate,
        act_fn=None,
    )
    x, idx, w = _routing(E, _dim(m), torch.float64)
    assert torch.equal(moekit_experts_forward(proxy, x, idx, w), moekit_experts_forward(m, x, idx, w))


def test_expert_parallel_sentinels_contribute_zero():
    m = _experts("qwen3_moe", "Qwen3MoeExperts")
    E = m.gate_up_proj.shape[0]
    x, idx, w = _routing(E, _dim(m), torch.float64)
    idx_s = idx.clone()
    idx_s[::3, 1] = E  # another rank's expert
    m._is_expert_parallel = True
    got = moekit_experts_forward(m, x, idx_s, w)
    w0 = w.clone()
    w0[::3, 1] = 0.0
    ref = _loop_reference(m, x, idx_s.clamp(max=E - 1), w0)
    assert (got - ref).abs().max() <= 1e-10
    m._is_expert_parallel = False
    with pytest.raises(ValueError, match="Qwen3MoeExperts.*expert ids >= 8"):
        moekit_experts_forward(m, x, idx_s, w)


def test_unknown_layout_flag_raises_naming_class_and_flag(monkeypatch):
    def decorator(experts_class=None, *, experts_interface=None, is_concatenated=True, has_fancy_norm=False):
        return experts_class

    monkeypatch.setattr(hf_experts, "_unknown_flags", {})
    hf_experts._note_unknown_flags(decorator)
    assert hf_experts._unknown_flags == {"has_fancy_norm": False}
    m = _experts("qwen3_moe", "Qwen3MoeExperts")
    x, idx, w = _routing(m.gate_up_proj.shape[0], _dim(m), torch.float64)
    moekit_experts_forward(m, x, idx, w)  # default value: fine
    m.has_fancy_norm = True
    with pytest.raises(NotImplementedError, match=r"Qwen3MoeExperts sets the layout flag has_fancy_norm=True"):
        moekit_experts_forward(m, x, idx, w)


def test_not_an_experts_module_raises():
    with pytest.raises(TypeError, match=r"Linear lacks the layout flag\(s\) has_bias, has_gate"):
        moekit_experts_forward(torch.nn.Linear(4, 4), torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.long),
                               torch.ones(2, 1))
    m = _experts("gpt_oss", "GptOssExperts")
    m.gate_up_proj_bias = None
    with pytest.raises(TypeError, match="GptOssExperts declares has_bias=True but gate_up_proj_bias is missing"):
        moekit_experts_forward(m, torch.zeros(2, _dim(m), dtype=torch.float64), torch.zeros(2, 1, dtype=torch.long),
                               torch.ones(2, 1, dtype=torch.float64))


def test_registered_in_experts_interface():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert hf_experts.is_registered()
    assert ALL_EXPERTS_FUNCTIONS["moekit"] is moekit_experts_forward


_SNIPPET = """
import sys
{first}
assert "transformers" not in sys.modules or {allow_tf}, "import moekit pulled in transformers"
{second}
from transformers import Qwen3MoeConfig, AutoModelForCausalLM
cfg = Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=16, moe_intermediate_size=8,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                     num_experts_per_tok=2)
m = AutoModelForCausalLM.from_config(cfg, experts_implementation="moekit")
assert m.config._experts_implementation == "moekit"
import torch
m(torch.tensor([[1, 2, 3]]))
print("ok")
"""


def test_registration_on_import_before_transformers():
    """``import moekit`` never imports transformers; after ``import moekit.convert`` (which installs the import hook)
    a model built with ``experts_implementation="moekit"`` validates and runs. A fresh interpreter."""
    code = _SNIPPET.format(first="import moekit, moekit.convert", allow_tf=False, second="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_registration_when_transformers_is_already_imported(monkeypatch):
    from transformers.integrations.moe import ExpertsInterface

    monkeypatch.delitem(ExpertsInterface._global_mapping, "moekit")
    assert not hf_experts.is_registered()
    hf_experts.register_when_imported()  # transformers' MoE integration is in sys.modules: registers at once
    assert hf_experts.is_registered()
    assert not any(isinstance(f, hf_experts._RegisterOnImport) for f in sys.meta_path)


@pytest.mark.parametrize("arch,cls_name", CASES)
def test_few_pairs_decode_path_matches_loop(arch, cls_name):
    """Generation's small steps (<= FEW_PAIRS pairs, no autograd, CPU) take the pair-by-pair path: same function."""
    m = _experts(arch, cls_name)
    E = (m.gate_up_proj if m.has_gate else m.up_proj).shape[0]
    x, idx, w = _routing(E, _dim(m), torch.float64)
    x, idx, w = x[:3], idx[:3], w[:3]
    assert x.shape[0] * idx.shape[1] <= hf_experts.FEW_PAIRS
    with torch.no_grad():
        got = moekit_experts_forward(m, x, idx, w)
        ref = _loop_reference(m, x, idx, w)
        grouped = moekit_experts_forward(m, x.repeat(9, 1), idx.repeat(9, 1), w.repeat(9, 1))[:3]  # > FEW_PAIRS
    assert (got - ref).abs().max() <= 1e-10
    assert (got - grouped).abs().max() <= 1e-10
    idx_s = idx.clone()
    idx_s[0, 0] = E
    with torch.no_grad(), pytest.raises(ValueError, match=f"{cls_name}.*expert id {E}"):
        moekit_experts_forward(m, x, idx_s, w)
    m._is_expert_parallel = True
    w0 = w.clone()
    w0[0, 0] = 0
    with torch.no_grad():
        got = moekit_experts_forward(m, x, idx_s, w)
    assert (got - _loop_reference(m, x, idx_s.clamp(max=E - 1), w0)).abs().max() <= 1e-10


@pytest.mark.parametrize("arch,cls_name", CASES)
@pytest.mark.parametrize("n_tok", [1, 3])
def test_few_pairs_float32_on_native_kernels_matches_loop(arch, cls_name, n_tok, monkeypatch):
    """float32 small steps run on moekit.ops.native where it takes the weights: the fused FFN for the default gate
    over a native activation and gpt-oss's clamped SwiGLU (on its (in, out)-stored weights), one call per projection
    around the module's own gating otherwise. Equal to the loop reference (float64) to 1e-5 relative, expert-parallel
    sentinels included."""
    from moekit.ops import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.why_unavailable()}")
    m = _experts(arch, cls_name, dtype=torch.float32)
    E = (m.gate_up_proj if m.has_gate else m.up_proj).shape[0]
    x, idx, w = _routing(E, _dim(m), torch.float32, seed=n_tok)
    x, idx, w = x[:n_tok], idx[:n_tok], w[:n_tok]
    calls = []
    for name in ("grouped_rows", "ffn"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    m64 = _experts(arch, cls_name, dtype=torch.float64)
    with torch.no_grad():
        got = moekit_experts_forward(m, x, idx, w)
        ref = _loop_reference(m64, x.double(), idx, w.double())
    fused = arch in ("qwen3_moe", "gpt_oss", "muse_spark")  # deepseek_v4: its own gate; nemotron_h: no gate
    assert (hf_experts._native_gating(m) is not None) == fused
    assert calls == (["ffn"] if fused else ["grouped_rows", "grouped_rows"])
    torch.testing.assert_close(got.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    m._is_expert_parallel = True
    idx_s = idx.clone()
    idx_s[0, 0] = E  # another rank's expert
    w0 = w.clone()
    w0[0, 0] = 0
    with torch.no_grad():
        got = moekit_experts_forward(m, x, idx_s, w)
    ref = _loop_reference(m64, x.double(), idx_s.clamp(max=E - 1), w0.double())
    torch.testing.assert_close(got.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
