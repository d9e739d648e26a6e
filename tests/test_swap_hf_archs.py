"""Full swaps (router and experts onto moekit) of gpt-oss, ERNIE-4.5-MoE, Hunyuan-MoE V1, PhiMoE, LongCat-Flash and
Llama 4:
tiny random causal LMs built from transformers' config classes (no download), on CPU.

Tolerances: logits within 1e-5 (float32) and 1e-10 (float64) of HF's eager experts; greedy tokens identical; the
gradient of every parameter within 1e-5 / 1e-10 (float32 / float64) relative to its largest entry; revert restores
the very same module objects and bit-identical logits. The configs make each architecture's special case bite:
gpt-oss's clamp (a small ``swiglu_limit``), PhiMoE's sparsemixer window (a wide ``router_jitter_noise``), LongCat's
zero-computation experts (2 of 8 ids), ERNIE's and LongCat's selection bias (random, not zero), Llama 4's router weight
on the expert input (a different function from weighting the output, checked).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit.convert import HFBlockAdapter, from_hf, is_hf_moe_block, revert_hf_moe, swap_hf_moe, to_hf  # noqa: E402

warnings.filterwarnings("ignore", message=".*experts_implementation.*")
warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

COMMON = dict(vocab_size=97, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _config(name: str):
    t = transformers
    if name == "gpt_oss":  # swiglu_limit small enough that the clamps act on the random weights
        return t.GptOssConfig(**COMMON, num_hidden_layers=2, head_dim=16, intermediate_size=32, num_local_experts=4,
                              num_experts_per_tok=2, swiglu_limit=0.5)
    if name == "ernie4_5_moe":  # one shared expert; every layer MoE
        return t.Ernie4_5_MoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32,
                                    moe_num_experts=6, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0)
    if name == "hunyuan_v1_moe":
        return t.HunYuanMoEV1Config(**COMMON, num_hidden_layers=2, head_dim=16, intermediate_size=32, num_experts=6,
                                    num_local_experts=6, moe_topk=2)
    if name == "phimoe":  # a wide sparsemixer window: the second pass often has several eligible experts
        return t.PhimoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=4,
                              num_experts_per_tok=2, router_jitter_noise=0.3)
    if name == "longcat_flash":  # 6 FFN experts + 2 zero-computation (identity) experts
        return t.LongcatFlashConfig(**COMMON, num_layers=2, head_dim=8, ffn_hidden_size=64, expert_ffn_hidden_size=32,
                                    n_routed_experts=6, zero_expert_num=2, moe_topk=2, kv_lora_rank=16,
                                    q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                    routed_scaling_factor=1.5)
    if name == "llama4":  # every layer MoE (interleave step 1), a shared expert, the weight scales the expert input
        return t.Llama4TextConfig(**COMMON, num_hidden_layers=2, head_dim=16, intermediate_size=32,
                                  intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=2)
    raise AssertionError(name)


CLASSES = {"gpt_oss": "GptOssForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
           "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM", "phimoe": "PhimoeForCausalLM",
           "longcat_flash": "LongcatFlashForCausalLM", "llama4": "Llama4ForCausalLM"}
MODELS = list(CLASSES)


def _model(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[name])(_config(name)).eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # the float64 reference (grouped_mm is float32/bf16 only)
    with torch.no_grad():
        for n, b in [*model.named_buffers(), *model.named_parameters()]:
            if "e_score_correction_bias" in n:
                b.copy_(torch.randn(b.shape) * 0.05)
    return model.to(dtype)


def _ids(B=2, S=10, seed=3):
    return torch.randint(3, 97, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_swap_exact_tokens_identical_and_reverts(name, dtype):
    model = _model(name, dtype)
    ids = _ids()
    logits0 = model(ids).logits
    gen0 = model.generate(ids, do_sample=False, max_new_tokens=6)
    originals = {n: m for n, m in model.named_modules() if is_hf_moe_block(m)}
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    handle = swap_hf_moe(model)
    assert sorted(handle.names) == sorted(originals) and len(handle) == 2
    assert all(isinstance(model.get_submodule(n), HFBlockAdapter) for n in originals)
    torch.testing.assert_close(model(ids).logits, logits0, atol=TOL[dtype], rtol=0)
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=6), gen0)
    # memory neutral: every parameter of the swapped model lives in the original model's storage
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} <= storages
    revert_hf_moe(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(model(ids).logits, logits0)


def _hf_grads_of(handle, model):
    """Every parameter gradient of a swapped (share=False) model under HF's names: the moekit layers' gradients are
    written into copies of the original blocks with to_hf (so the layout mapping is the converter's own)."""
    grads = {n: p.grad for n, p in model.named_parameters() if ".moe." not in n and p.grad is not None}
    for s in handle.swapped:
        g_layer = copy.deepcopy(s.adapter.moe)
        live = dict(s.adapter.moe.named_parameters())
        with torch.no_grad():
            for n, p in g_layer.named_parameters():
                p.copy_(live[n].grad if live[n].grad is not None else torch.zeros_like(p))
        g_block = copy.deepcopy(s.original)
        with torch.no_grad():
            for p in g_block.parameters():  # what to_hf does not write (LongCat's unused rows) has no gradient
                p.zero_()
        g_block = to_hf(g_layer, g_block)
        for n, p in g_block.named_parameters():
            grads[f"{s.qualname}.{n}"] = p.detach()
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", MODELS)
def test_gradients_match(name, dtype):
    hf = _model(name, dtype)
    sw = copy.deepcopy(hf)
    ids = _ids()
    handle = swap_hf_moe(sw, share=False)
    loss_hf = hf(ids, labels=ids).loss
    loss_sw = sw(ids, labels=ids).loss
    torch.testing.assert_close(loss_sw, loss_hf, atol=TOL[dtype], rtol=0)
    loss_hf.backward()
    loss_sw.backward()
    got = _hf_grads_of(handle, sw)
    checked = 0
    for n, p in hf.named_parameters():
        if p.grad is None:
            continue
        scale = p.grad.abs().max().clamp_min(1e-30)
        err = float((got[n] - p.grad).abs().max() / scale)
        assert err <= TOL[dtype], f"{name}: gradient of {n} differs by {err:.1e} (relative)"
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_block_round_trip_through_config(name):
    """to_hf(from_hf(block), config) builds a new block computing the same function; to_hf refuses other routers."""
    model = _model(name)
    block = next(m for m in model.modules() if is_hf_moe_block(m))
    layer = from_hf(block)
    x = torch.randn(2, 5, 64)
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(layer(x), out.view(x.shape), atol=1e-5, rtol=0)  # Llama 4's block flattens tokens
    back = to_hf(layer, model.config).eval()
    back_out = back(x)
    back_out = back_out[0] if isinstance(back_out, tuple) else back_out
    torch.testing.assert_close(back_out, out, atol=1e-6, rtol=0)
    other = moekit.MoE(layer.dim, layer.num_experts, router=moekit.TopK(k=1), experts=layer.config.experts)
    with pytest.raises(ValueError, match="router"):
        to_hf(other, block)


@torch.no_grad()
def test_routing_exercises_each_special_case():
    """The test configs are not degenerate: clamps bite, copy experts and the sparsemixer window are used."""
    m = _model("gpt_oss")
    ex = m.model.layers[0].mlp.experts
    x = torch.randn(64, 64)
    h = x @ ex.gate_up_proj[0] + ex.gate_up_proj_bias[0]
    assert (h[:, 0::2] > ex.limit).any() and (h[:, 1::2].abs() > ex.limit).any()

    m = _model("longcat_flash")
    layer = from_hf(m.model.layers[0].mlp)
    a = layer.forward_with_aux(torch.randn(64, 64)).assignment
    assert a.num_free_experts == 2 and (a.expert_N >= 6).any() and (a.expert_N < 6).any()

    m = _model("phimoe")
    layer = from_hf(m.model.layers[0].mlp)
    w = layer.forward_with_aux(torch.randn(64, 64)).assignment.weight_N
    assert (w < 0.999).any() and (w > 0.999).any()  # some windows hold one expert, some several

    m = _model("llama4")  # weighting the input is not weighting the output: the same layer with weight_at="output"
    block = m.model.layers[0].feed_forward
    layer = from_hf(block)
    assert layer.dispatcher.weight_at == "input"
    x = torch.randn(64, 64)
    as_output = copy.deepcopy(layer)
    as_output.dispatcher = moekit.Dropless().build(as_output.num_experts)
    assert float((as_output(x) - block(x)[0]).abs().max()) > 1e-3
    torch.testing.assert_close(layer(x), block(x)[0], atol=1e-5, rtol=0)
    adapter = swap_hf_moe(m).swapped[0].adapter
    y, logits = adapter(torch.randn(2, 3, 64))
    assert y.shape == (6, 64) and logits.shape == (6, 4)  # returns what Llama4TextMoe returns
    with pytest.raises(ValueError, match="Llama4TextMoe dispatches as .*weight_at='input'"):
        to_hf(as_output, copy.deepcopy(block))


def test_phimoe_training_mode_matches_hf_under_one_seed():
    """In training SparseMixer samples (Gumbel) and uses Heun's gradient estimate; with the same seed the swapped
    model draws the same experts and gets the same loss and router gradients as transformers."""
    hf = _model("phimoe", torch.float64).train()
    sw = copy.deepcopy(hf)
    handle = swap_hf_moe(sw, share=False)
    ids = _ids()
    torch.manual_seed(11)
    loss_hf = hf(ids, labels=ids).loss
    torch.manual_seed(11)
    loss_sw = sw(ids, labels=ids).loss
    torch.testing.assert_close(loss_sw, loss_hf, atol=1e-10, rtol=0)
    loss_hf.backward()
    loss_sw.backward()
    got = _hf_grads_of(handle, sw)
    for n, p in hf.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-10 * float(p.grad.abs().max()), rtol=0)


def test_swapped_model_post_init_and_router_logits():
    """HF's init reaches the moekit tensors through the views (gpt-oss's biases too); router logits still reported."""
    for name in ("gpt_oss", "longcat_flash", "llama4"):
        model = _model(name)
        ids = _ids()
        with torch.no_grad():
            ref = model(ids, output_router_logits=True).router_logits
        swap_hf_moe(model)
        with torch.no_grad():
            got = model(ids, output_router_logits=True).router_logits
        assert len(got) == len(ref) == 2
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        for m in model.modules():
            m._is_hf_initialized = False
        model.init_weights()  # must not raise: every attribute HF's _init_weights touches resolves
        if name == "gpt_oss":
            assert torch.count_nonzero(model.model.layers[0].mlp.moe.experts.b13_E2F) == 0  # zeroed by HF's init


def test_errors_name_the_architecture_and_what_is_missing(monkeypatch):
    from moekit.convert import hf as hf_convert

    t = transformers
    dense = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM has no supported MoE block"):
        swap_hf_moe(dense)
    with pytest.raises(ValueError, match="LlamaMLP is not a supported transformers MoE block"):
        from_hf(dense.model.layers[0].mlp)
    # a block known not to convert is named with what moekit lacks for it (none in this transformers: simulated)
    monkeypatch.setitem(hf_convert.NOT_CONVERTIBLE, "LlamaMLP", "is dense")
    with pytest.raises(ValueError, match="LlamaMLP is dense"):
        swap_hf_moe(dense)

    ernie = _model("ernie4_5_moe")
    block = ernie.model.layers[0].mlp
    block.gate.norm_min = 0.9  # a floor above k/E changes the weights: refused, not silently ignored
    with pytest.raises(ValueError, match="moe_norm_min"):
        from_hf(block)
