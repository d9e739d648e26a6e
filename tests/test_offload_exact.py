"""Offloaded experts with no lossy option give the fully loaded model's logits (float32, atol 1e-5) and identical
greedy tokens, at several budgets, for Qwen3-MoE, Mixtral, DeepSeek-V3 and gpt-oss checkpoints written by
save_pretrained (per-expert layout) and for a fused 3-D layout checkpoint."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from offload_models import ARCHS, save_tiny  # noqa: E402

from moekit.offload import load_offloaded  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for name in ARCHS:
        d = tmp_path_factory.mktemp(name)
        save_tiny(name, d)
        out[name] = d
    return out


def _ids(seed=3, B=1, S=7):
    return torch.randint(3, 97, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_greedy_tokens_identical_at_every_budget(ckpts, name):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpts[name]).eval()
    ids = _ids()
    want_logits = ref(ids).logits
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)
    # stacked-weight implementations (grouped_mm, moekit's) run once per touched expert; eager / auto in one call
    for budget, inner, prefetch in [("100%", "grouped_mm", False), ("30%", "eager", True), ("1", None, False),
                                    ("40%", "moekit", True)]:
        if budget == "1":  # smallest legal budget: one expert
            om0 = load_offloaded(ckpts[name], "100%")
            budget = om0.runtime.expert_bytes(0)
        om = load_offloaded(ckpts[name], budget, inner=inner or "auto", prefetch=prefetch)
        got_logits = om.model(ids).logits
        torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
        got = om.model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(got, want), (name, budget)
        st = om.stats()
        assert st["cache"]["misses"] > 0 and st["cache_bytes"] <= om.budget_bytes
        assert st["cache"]["peak_bytes"] <= om.budget_bytes
        om.close()


@torch.no_grad()
def test_longcat_zero_computation_experts_offload(tmp_path):
    """LongCat-Flash (transformers >= 5.25 decorates its experts): identity ids reach the experts module re-pointed at
    FFN experts with weight 0; offloaded, they fetch (and cache) those experts and the tokens stay the model's."""
    from transformers import AutoModelForCausalLM

    from moekit.offload.loader import find_experts_modules

    save_tiny("longcat_flash", tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    if not find_experts_modules(ref):
        pytest.skip("this transformers' LongcatFlashExperts is not an experts-implementation class")
    ids = _ids()
    want_logits, want = ref(ids).logits, ref.generate(ids, max_new_tokens=8, do_sample=False)
    for budget, inner in [("100%", "grouped_mm"), ("30%", "eager"), ("40%", "moekit")]:
        om = load_offloaded(tmp_path, budget, inner=inner)
        torch.testing.assert_close(om.model(ids).logits, want_logits, atol=1e-5, rtol=0)
        assert torch.equal(om.model.generate(ids, max_new_tokens=8, do_sample=False), want), budget
        assert om.stats()["cache"]["misses"] > 0
        om.close()


@torch.no_grad()
def test_working_groups_split_prefill_and_stay_close(ckpts):
    """A working set of one expert forces the grouped path (order of sums differs: 1e-5, tokens identical)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpts["qwen3_moe"]).eval()
    ids = _ids(B=2, S=9)
    om = load_offloaded(ckpts["qwen3_moe"], "50%", working_bytes=1)
    torch.testing.assert_close(om.model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(om.model.generate(ids, max_new_tokens=5, do_sample=False),
                       ref.generate(ids, max_new_tokens=5, do_sample=False))


@torch.no_grad()
def test_fused_layout_checkpoint(ckpts, tmp_path):
    """A checkpoint storing experts as stacked [E, ...] tensors (transformers 5 layout) is read one row at a time."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpts["mixtral"]).eval()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref.config.save_pretrained(tmp_path)
    om = load_offloaded(tmp_path, "40%")
    assert om.runtime.sources[0].fused is not None
    ids = _ids()
    torch.testing.assert_close(om.model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(om.model.generate(ids, max_new_tokens=6, do_sample=False),
                       ref.generate(ids, max_new_tokens=6, do_sample=False))


@torch.no_grad()
@pytest.mark.parametrize("inner", ["eager", "callable"])
def test_cache_hits_hand_over_the_cached_tensors_without_copy(ckpts, inner):
    """A hit costs no copy: eager gets the cached tensors themselves (in a per-expert list indexed by the original
    expert ids, no remapping), a stacked-weight implementation a one-expert view of them; same output as eager."""
    from moekit.offload.proxy import resolve_inner

    om = load_offloaded(ckpts["qwen3_moe"], "100%", inner="eager", working_bytes=2**30)  # one working group
    ex = om.model.model.layers[0].mlp.experts
    eager, _ = resolve_inner("eager", ex._template)
    seen = []

    def spy(proxy, x, idx, w):
        seen.append((proxy, idx.clone()))
        return eager(proxy, x, idx, w)

    if inner == "callable":
        ex.inner, ex.zero_copy = spy, False
    else:
        ex.inner = spy
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[1, 6], [6, 3], [3, 1]])
    w = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    out = ex(x, idx, w)
    full = eager(_full_proxy(om, ex), x, idx, w)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=0)
    if inner == "eager":
        proxy = seen[0][0]
        assert [i for i, t in enumerate(proxy.gate_up_proj) if t is not None] == [1, 3, 6]
        for e in (1, 3, 6):
            assert proxy.gate_up_proj[e].data_ptr() == om.cache.items[(0, e)].tensors["gate_up_proj"].data_ptr()
    if inner == "eager":
        assert len(seen) == 1 and torch.equal(seen[0][1], idx)  # one call, original ids
    else:
        assert len(seen) == 3 and all(p.num_experts == 1 for p, _ in seen)
        ptrs = {p.gate_up_proj.data_ptr() for p, _ in seen}
        assert ptrs == {om.cache.items[(0, e)].tensors["gate_up_proj"].data_ptr() for e in (1, 3, 6)}
    om.close()


def _full_proxy(om, ex):
    """A proxy holding every expert of layer 0, read straight from the checkpoint (the fully loaded reference)."""
    from moekit.offload.proxy import ExpertsProxy

    src = om.runtime.sources[0]
    ws = [src.read(e)[0] for e in range(src.num_experts)]
    return ExpertsProxy(ex._template, {p: torch.stack([w[p] for w in ws]) for p in ws[0]}, src.num_experts)
