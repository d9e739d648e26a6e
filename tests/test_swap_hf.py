"""moekit.convert.swap_hf_moe / revert_hf_moe on tiny random transformers causal LMs (no download).

Tolerances: float32 logits within atol 1e-5 before/after swap; greedy tokens identical; revert restores the very same
module objects, and with them bit-identical logits.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit.convert import HFBlockAdapter, is_hf_moe_block, revert_hf_moe, swap_hf_moe  # noqa: E402

warnings.filterwarnings("ignore", message=".*experts_implementation.*")

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
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
        cfg = t.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
        cls = t.MixtralForCausalLM
    elif name == "qwen2_moe":  # layer 1 dense (mlp_only_layers): must be left alone
        cfg = t.Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                               shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
                               mlp_only_layers=[1])
        cls = t.Qwen2MoeForCausalLM
    elif name == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**COMMON, head_dim=16, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                               norm_topk_prob=True)
        cls = t.Qwen3MoeForCausalLM
    elif name == "olmoe":
        cfg = t.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=6, num_experts_per_tok=2)
        cls = t.OlmoeForCausalLM
    elif name == "deepseek_v3":  # layer 0 dense (first_k_dense_replace)
        cfg = t.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=96, moe_intermediate_size=32,
                                 n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
                                 num_experts_per_tok=2, routed_scaling_factor=2.0, first_k_dense_replace=1,
                                 q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                 v_head_dim=16)
        cls = t.DeepseekV3ForCausalLM
    elif name in ("glm4_moe", "dots1"):  # DeepSeek-V3's block verbatim; layer 0 dense
        cls = t.Glm4MoeForCausalLM if name == "glm4_moe" else t.Dots1ForCausalLM
        cfg = (t.Glm4MoeConfig if name == "glm4_moe" else t.Dots1Config)(
            **COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
            n_shared_experts=1, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
            routed_scaling_factor=2.0)
    elif name == "qwen3_next":  # Qwen2-MoE's block verbatim; one linear-attention (gated delta) layer
        cfg = t.Qwen3NextConfig(**COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
                                layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                                linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
        cls = t.Qwen3NextForCausalLM
    elif name == "minimax":  # Mixtral's block verbatim; one lightning-attention layer
        cfg = t.MiniMaxConfig(**COMMON, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                              layer_types=["linear_attention", "full_attention"], block_size=4)
        cls = t.MiniMaxForCausalLM
    elif name == "flex_olmo":  # OLMoE's block verbatim
        cfg = t.FlexOlmoConfig(**COMMON, intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        cls = t.FlexOlmoForCausalLM
    elif name == "jamba":  # unnormalised top-k softmax, router under block.router; one Mamba layer
        cfg = t.JambaConfig(**COMMON, intermediate_size=32, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                            attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0, mamba_d_state=8,
                            mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False)
        cls = t.JambaForCausalLM
    elif name in ("granitemoe", "granitemoeshared"):  # softmax over the top-k logits; -shared: MLP beside the block
        shared = dict(shared_intermediate_size=24) if name == "granitemoeshared" else {}
        cfg = (t.GraniteMoeConfig if name == "granitemoe" else t.GraniteMoeSharedConfig)(
            **COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **shared)
        cls = t.GraniteMoeForCausalLM if name == "granitemoe" else t.GraniteMoeSharedForCausalLM
    elif name.startswith("deepseek_v2"):  # softmax router, group-limited by the group max; layer 0 dense
        greedy = name == "deepseek_v2_greedy"
        cfg = t.DeepseekV2Config(**COMMON, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                                 n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                 routed_scaling_factor=1.5, topk_method="greedy" if greedy else "group_limited_greedy",
                                 n_group=4, topk_group=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                 qk_nope_head_dim=8, v_head_dim=16)
        cls = t.DeepseekV2ForCausalLM
    else:
        raise AssertionError(name)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(torch.randn(b.shape) * 0.05)
    return model


MODELS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "dots1", "qwen3_next", "minimax",
          "flex_olmo", "jamba", "granitemoe", "granitemoeshared", "deepseek_v2", "deepseek_v2_greedy"]
EXPECTED_SWAPS = {"mixtral": 2, "qwen2_moe": 1, "qwen3_moe": 2, "olmoe": 2, "deepseek_v3": 2, "glm4_moe": 1, "dots1": 1,
                  "qwen3_next": 2, "minimax": 2, "flex_olmo": 2, "jamba": 2, "granitemoe": 2,
                  "granitemoeshared": 2, "deepseek_v2": 1, "deepseek_v2_greedy": 1}


def _ids(B=2, S=10, seed=3):
    return torch.randint(3, 97, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_swap_gives_same_logits_and_tokens_and_reverts(name):
    model = _model(name)
    ids = _ids()
    logits0 = model(ids).logits
    gen0 = model.generate(ids, do_sample=False, max_new_tokens=8)
    originals = {n: m for n, m in model.named_modules() if is_hf_moe_block(m)}
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    handle = swap_hf_moe(model)
    assert len(handle) == EXPECTED_SWAPS[name] == len(originals)
    assert sorted(handle.names) == sorted(originals)
    for n in originals:
        assert isinstance(model.get_submodule(n), HFBlockAdapter)
    assert len([m for m in model.modules() if isinstance(m, moekit.MoE)]) == EXPECTED_SWAPS[name]
    torch.testing.assert_close(model(ids).logits, logits0, atol=1e-5, rtol=0)
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=8), gen0)
    # memory neutral: every parameter of the swapped model lives in the original model's storage
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == storages

    revert_hf_moe(model)
    for n, m in originals.items():
        assert model.get_submodule(n) is m
    assert not any(isinstance(m, HFBlockAdapter) for m in model.modules())
    assert torch.equal(model(ids).logits, logits0)
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=8), gen0)


@torch.no_grad()
def test_copy_mode_and_output_router_logits():
    """share=False copies; router logits and HF's aux loss are still reported (hooks set up before and after)."""
    model = _model("mixtral")
    ids = _ids()
    ref = model(ids, output_router_logits=True)  # installs transformers' output hooks on the original routers
    handle = swap_hf_moe(model, share=False)
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) == 2
    for a, b in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    mlp = model.model.layers[0].mlp
    assert mlp.moe.experts.w13_E2FD.data_ptr() != handle.swapped[0].original.experts.gate_up_proj.data_ptr()
    handle.revert()
    assert torch.equal(model(ids, output_router_logits=True).aux_loss, ref.aux_loss)

    fresh = _model("olmoe")  # swapped before its first forward: the hooks are installed on the adapters' taps
    want = fresh.__class__(fresh.config).eval()
    want.load_state_dict(fresh.state_dict())
    ref = want(ids, output_router_logits=True)
    swap_hf_moe(fresh)
    torch.testing.assert_close(fresh(ids, output_router_logits=True).aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    revert_hf_moe(fresh)
    assert len(fresh(ids, output_router_logits=True).router_logits) == 2


def test_training_through_the_swap_matches_hf_and_survives_revert():
    """Same loss and gradients as the HF model; an optimizer step on the swapped model is kept by revert."""
    hf = _model("qwen3_moe").train()
    sw = copy.deepcopy(hf)
    ids = _ids()
    swap_hf_moe(sw)
    loss_hf = hf(ids, labels=ids).loss
    loss_sw = sw(ids, labels=ids).loss
    torch.testing.assert_close(loss_sw, loss_hf, atol=1e-6, rtol=0)
    loss_hf.backward()
    loss_sw.backward()
    torch.testing.assert_close(sw.model.embed_tokens.weight.grad, hf.model.embed_tokens.weight.grad, atol=1e-6, rtol=0)
    Fh = hf.model.layers[0].mlp.experts.down_proj.shape[-1]
    g_hf = hf.model.layers[0].mlp.experts.gate_up_proj.grad
    bank = sw.model.layers[0].mlp.moe.experts
    torch.testing.assert_close(bank.w13_E2FD.grad, g_hf, atol=1e-6, rtol=0)
    g_router = hf.model.layers[0].mlp.gate.weight.grad
    torch.testing.assert_close(sw.model.layers[0].mlp.moe.router.gate.weight.grad, g_router, atol=1e-6, rtol=0)
    opt = torch.optim.SGD(sw.parameters(), lr=0.1)
    opt.step()
    before = hf.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    revert_hf_moe(sw)
    after = sw.model.layers[0].mlp.experts.gate_up_proj
    torch.testing.assert_close(after[:, :Fh], before[:, :Fh] - 0.1 * bank.w13_E2FD.grad[:, :Fh], atol=1e-7, rtol=0)


@torch.no_grad()
def test_switch_transformers_swap_copies_and_keeps_router_outputs():
    t = transformers
    cfg = t.SwitchTransformersConfig(vocab_size=97, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                                     num_decoder_layers=2, num_experts=4, expert_capacity=4, num_sparse_encoder_layers=1,
                                     num_sparse_decoder_layers=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = t.SwitchTransformersForConditionalGeneration(cfg).eval()
    kw = dict(input_ids=_ids(), decoder_input_ids=_ids(S=6, seed=4), output_router_logits=True)
    ref = model(**kw)
    with pytest.raises(ValueError, match="share=False"):
        swap_hf_moe(model)
    handle = swap_hf_moe(model, share=False)
    assert handle.names == ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"]
    out = model(**kw)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    for key in ("encoder_router_logits", "decoder_router_logits"):
        assert len(out[key]) == 1
        torch.testing.assert_close(out[key][0], ref[key][0], atol=1e-5, rtol=0)  # (B, S, E), as HF reports them
    for key in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-6)
    handle.revert()
    assert torch.equal(model(**kw).logits, ref.logits)


@torch.no_grad()
def test_adapter_can_return_a_tuple_like_older_blocks():
    from moekit.convert import from_hf

    block = _model("olmoe").model.layers[0].mlp
    adapter = HFBlockAdapter(from_hf(block), "OlmoeSparseMoeBlock", returns_tuple=True)
    x = torch.randn(2, 5, 64)
    y, logits = adapter(x)
    torch.testing.assert_close(y, block(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, block.gate(x)[0], atol=1e-5, rtol=0)


def test_swap_errors():
    model = _model("olmoe")
    swap_hf_moe(model)
    with pytest.raises(ValueError, match="already swapped"):
        swap_hf_moe(model)
    revert_hf_moe(model)
    with pytest.raises(ValueError, match="not swapped"):
        revert_hf_moe(model)
    with pytest.raises(ValueError, match="no supported MoE block.*MixtralSparseMoeBlock"):
        swap_hf_moe(torch.nn.Sequential(torch.nn.Linear(4, 4)))
