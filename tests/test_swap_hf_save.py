"""A swapped transformers model stays a transformers citizen: save_pretrained -> from_pretrained round trips (plain
transformers and re-swapped, share=True and share=False), post_init / init_weights, the fp32 and TP-plan rules,
set_experts_implementation, optimizers, dtype moves and router jitter (tiny random models, no download).

Tolerances: a re-swapped reload computes bit-identical logits (same weights, same moekit computation); a plain
transformers reload matches the swapped model within float32 atol 1e-5 (HF eager vs moekit), greedy tokens equal.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from moekit.convert import HFBlockAdapter, revert_hf_moe, swap_hf_moe, to_hf  # noqa: E402

warnings.filterwarnings("ignore", message=".*experts_implementation.*")

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(name: str):
    t = transformers
    if name == "mixtral":
        cfg, cls = t.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2), \
            t.MixtralForCausalLM
    elif name == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                               shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
        cls = t.Qwen2MoeForCausalLM
    elif name == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2, head_dim=8)
        cls = t.Qwen3MoeForCausalLM
    elif name == "olmoe":
        cfg, cls = t.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2), \
            t.OlmoeForCausalLM
    elif name == "deepseek_v3":  # HF's own test config: E=8, n_group=2, topk_group=1, k=8 (k > the eligible experts)
        cfg = t.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 2}, intermediate_size=48, moe_intermediate_size=16,
                                 n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                                 num_experts_per_tok=8, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
        cls = t.DeepseekV3ForCausalLM
    else:
        raise AssertionError(name)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(torch.randn(b.shape) * 0.05)
    return model


def _ids(B=2, S=8, seed=3):
    return torch.randint(3, 97, (B, S), generator=torch.Generator().manual_seed(seed))


def _perturb_experts(model) -> None:
    """Change every moekit expert weight (as training would), so a save that ignored the moekit side shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HFBlockAdapter):
                for p in m.moe.experts.parameters():
                    p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
@torch.no_grad()
def test_save_pretrained_round_trips(name, share, tmp_path):
    model = _model(name)
    model.save_pretrained(tmp_path / "hf")  # what plain transformers writes (e.g. Mixtral's per-expert w1/w2/w3)
    hf_keys = set(safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors")))
    tmp_path = tmp_path / "swapped"
    swap_hf_moe(model, share=share)
    _perturb_experts(model)
    ids = _ids()
    want = model(ids).logits
    tokens = model.generate(ids, do_sample=False, max_new_tokens=5)
    model.save_pretrained(tmp_path)
    assert isinstance(model.model.layers[0].mlp, HFBlockAdapter)  # still swapped after the save
    saved = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == hf_keys  # HF's names and layout

    plain = type(model).from_pretrained(tmp_path).eval()  # plain transformers
    assert not any(isinstance(m, HFBlockAdapter) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=0)
    assert torch.equal(plain.generate(ids, do_sample=False, max_new_tokens=5), tokens)

    again = type(model).from_pretrained(tmp_path).eval()
    swap_hf_moe(again, share=share)  # re-swapped: the same computation on the same weights
    assert torch.equal(again(ids).logits, want)


@torch.no_grad()
def test_base_model_save_and_reload(tmp_path):
    model = _model("qwen2_moe")
    hf_keys = set(model.state_dict())
    handle = swap_hf_moe(model)
    with handle.hf_modules():  # an HF-named state dict of the swapped model
        assert set(model.state_dict()) == hf_keys
    assert isinstance(model.model.layers[0].mlp, HFBlockAdapter) and set(model.state_dict()) != hf_keys
    ids = _ids()
    want = model.model(ids).last_hidden_state
    model.base_model.save_pretrained(tmp_path)
    base = transformers.Qwen2MoeModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(base(ids).last_hidden_state, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("share", [True, False])
@torch.no_grad()
def test_post_init_and_init_weights_reach_moekit_tensors(share):
    model = _model("deepseek_v3")
    ids = _ids()
    handle = swap_hf_moe(model, share=share)
    want = model(ids).logits
    model.post_init()  # HF skips what was initialised: nothing changes, nothing raises
    assert torch.equal(model(ids).logits, want)

    for m in model.modules():  # force a re-initialisation through HF's _init_weights
        m._is_hf_initialized = False
    layer = handle.layers[0]
    router_before = layer.router.gate.weight.clone()
    w13_before = layer.experts.w13_E2FD.clone()
    layer.router.bias_E.fill_(0.3)
    model.init_weights()
    assert not torch.equal(layer.router.gate.weight, router_before)
    assert not torch.equal(layer.experts.w13_E2FD, w13_before)  # through the HF experts view (gate_up_proj layout)
    assert torch.equal(layer.router.bias_E, torch.zeros_like(layer.router.bias_E))  # HF zeroes the correction bias
    std = model.config.initializer_range
    assert abs(layer.experts.w2_EDF.std().item() - std) < 0.3 * std
    assert torch.isfinite(model(ids).logits).all()


@torch.no_grad()
def test_meta_swap_to_empty_then_init_weights():
    """transformers' meta-device recipe: build on meta, move with to_empty, init_weights (every tensor reached)."""
    with torch.device("meta"):
        model = _model("mixtral")
    handle = swap_hf_moe(model)
    model.to_empty(device="cpu")
    for m in model.modules():
        m._is_hf_initialized = False
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.fill_(float("nan"))
    model.init_weights()
    bank = handle.layers[0].experts
    for w in (bank.w13_E2FD, bank.w2_EDF, handle.layers[0].router.gate.weight):
        assert torch.isfinite(w).all()
    assert torch.isfinite(model(_ids()).logits).all()


def test_fp32_rules_tp_plans_and_set_experts_implementation():
    model = _model("deepseek_v3")
    plan_before = dict(model.tp_plan)
    fp32_before = set(model._keep_in_fp32_modules_strict)
    handle = swap_hf_moe(model)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert "bias_E" in model._keep_in_fp32_modules_strict and "e_score_correction_bias" not in \
        model._keep_in_fp32_modules_strict
    assert any(n.endswith("router.bias_E") for n in names)
    assert not any("experts.gate_up_proj" in k for k in model.tp_plan)  # HF expert entries dropped, nothing stale
    assert all(k in plan_before for k in model.tp_plan)
    with pytest.warns(UserWarning, match="swapped onto moekit"):
        model.set_experts_implementation("eager")
    handle.revert()
    assert model.tp_plan == plan_before and set(model._keep_in_fp32_modules_strict) == fp32_before
    assert "save_pretrained" not in model.__dict__


def test_swap_declines_a_tensor_parallel_model():
    model = _model("mixtral")
    model._tp_size = 2
    with pytest.raises(ValueError, match="tensor-parallel"):
        swap_hf_moe(model)


def test_optimizer_built_before_the_swap_keeps_training_the_experts():
    """share=True: every moekit Parameter of a swapped block *is* the HF Parameter (fused gate/up bank = gate_up_proj),
    so an optimizer built before the swap trains the swapped model, step for step like the unswapped model."""
    hf = _model("qwen2_moe").train()
    sw = copy.deepcopy(hf)
    opt_hf = torch.optim.SGD(hf.parameters(), lr=0.1)
    opt_sw = torch.optim.SGD(sw.parameters(), lr=0.1)  # built before the swap
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: no Parameter is replaced
        handle = swap_hf_moe(sw)
    assert handle.replaced_parameters == []
    orig = handle.swapped[0].original
    assert handle.layers[0].experts.w13_E2FD is orig.experts.gate_up_proj
    ids = _ids()
    for _ in range(2):
        for model, opt in ((hf, opt_hf), (sw, opt_sw)):
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
    a = hf.model.layers[0].mlp.experts.gate_up_proj
    torch.testing.assert_close(handle.layers[0].experts.w13_E2FD, a, atol=1e-6, rtol=0)
    assert not torch.equal(a, _model("qwen2_moe").model.layers[0].mlp.experts.gate_up_proj)  # it did train


def test_share_false_reports_the_copied_parameters():
    model = _model("mixtral")
    handle = swap_hf_moe(model, share=False)
    names = [n for n, _ in handle.replaced_parameters]
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names


@torch.no_grad()
def test_swap_double_revert_restores_one_dtype():
    model = _model("deepseek_v3")
    ids = _ids()
    swap_hf_moe(model)
    model.double()
    want = model(ids).logits
    revert_hf_moe(model)
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    assert dtypes == {torch.float64}
    model.set_experts_implementation("eager")  # HF's default grouped_mm has no float64 kernel
    # DeepSeek routes in float32 even in a float64 model: the k=8 weights are renormalised in float32, summed in
    # another order by HF (unsorted top-k) than by moekit, hence float32-level differences
    torch.testing.assert_close(model(ids).logits, want, atol=1e-6, rtol=0)


@torch.no_grad()
def test_to_hf_does_not_keep_a_router_jitter_silently():
    from moekit.convert import from_hf

    cfg = transformers.MixtralConfig(hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                                     router_jitter_noise=0.1)
    cfg._experts_implementation = "eager"
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
    layer = from_hf(block)
    assert layer.router.spec.jitter == pytest.approx(0.1)
    to_hf(layer, block)  # same jitter: fine
    plain = copy.deepcopy(block)
    plain.jitter_noise = 0.0
    with pytest.raises(ValueError, match="jitter"):
        to_hf(layer, plain)
    cfg2 = transformers.MixtralConfig(**{**json.loads(cfg.to_json_string()), "router_jitter_noise": 0.0})
    cfg2._experts_implementation = "eager"
    with pytest.raises(ValueError, match="jitter"):
        to_hf(from_hf(plain), block)
