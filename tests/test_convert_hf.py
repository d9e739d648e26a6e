"""moekit.convert.from_hf / to_hf against the transformers MoE blocks themselves (tiny random configs, no download).

Tolerances: float32 outputs within atol 1e-5, float64 within 1e-10 (moekit copies each block's router precision
policy, so HF's float32 softmax / float32 router is reproduced in float64 runs too); router logits within the same
tolerances; expert choices equal as sets; round-trip weights bit-identical.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit.convert import SUPPORTED_BLOCKS, from_hf, is_hf_moe_block, to_hf  # noqa: E402

warnings.filterwarnings("ignore", message=".*experts_implementation.*")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: intra-op threads only add overhead (and stall badly on a shared, loaded machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


D = 32
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _configs():
    from transformers import (
        DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig, SwitchTransformersConfig,
    )

    return {
        "mixtral": MixtralConfig(hidden_size=D, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                    num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
        "qwen2_moe_norm": Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                         num_experts=5, num_experts_per_tok=3, norm_topk_prob=True),
        "qwen3_moe": Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                    norm_topk_prob=True),
        "olmoe": OlmoeConfig(hidden_size=D, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                             norm_topk_prob=False),
        "deepseek_v3": DeepseekV3Config(hidden_size=D, moe_intermediate_size=16, n_routed_experts=8,
                                        n_shared_experts=2, n_group=4, topk_group=2, num_experts_per_tok=3,
                                        routed_scaling_factor=2.5, norm_topk_prob=True),
        "deepseek_v3_nonorm": DeepseekV3Config(hidden_size=D, moe_intermediate_size=16, n_routed_experts=8,
                                               n_shared_experts=1, n_group=2, topk_group=1, num_experts_per_tok=2,
                                               routed_scaling_factor=1.0, norm_topk_prob=False),
        "switch": SwitchTransformersConfig(d_model=D, d_ff=24, num_experts=4, expert_capacity=3),
        "switch_bias": SwitchTransformersConfig(d_model=D, d_ff=24, num_experts=4, expert_capacity=64, router_bias=True,
                                                dense_act_fn="gelu_new"),
    }


CASES = list(_configs())
GATED = [c for c in CASES if not c.startswith("switch")]


def _block_class(config):
    from moekit.convert.hf import _ARCHS

    return next(a for a in _ARCHS if a.model_type == config.model_type).block_type()


def _randomize(block: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1]
            std = 0.3 if ("gate.weight" in name or "router" in name) and "gate_proj" not in name else fan_in**-0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in block.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block


def make_block(case: str, dtype=torch.float32, impl: str = "eager", seed: int = 0, **overrides) -> nn.Module:
    config = _configs()[case]
    for k, v in overrides.items():
        setattr(config, k, v)
    config._experts_implementation = impl
    block = _block_class(config)(config)
    return _randomize(block, seed).to(dtype).eval()


def _x(dtype, B=3, S=7, seed=1):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _router_call(block, x):
    """HF's (logits_TE, sorted chosen experts (T, k), their weights)."""
    if hasattr(block, "router"):  # SwitchTransformers: capacity-masked one-hot, max prob, logits (B, S, E)
        onehot, probs, logits = block.router(x)
        idx = logits.reshape(-1, logits.shape[-1]).argmax(-1, keepdim=True)
        return logits.reshape(-1, logits.shape[-1]), idx, probs.reshape(-1, 1)
    logits, w, idx = block.gate(x.reshape(-1, x.shape[-1]))
    order = idx.argsort(-1)
    return logits, idx.gather(1, order), w.gather(1, order)


def _moekit_router_call(layer, x):
    a = layer.router(x.reshape(-1, x.shape[-1]))
    T = a.num_tokens
    idx = a.expert_N.reshape(-1, T).t()
    w = a.weight_N.reshape(-1, T).t()
    order = idx.argsort(-1)
    return a.logits_TE, idx.gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_from_hf_outputs_and_routing_match(case, dtype):
    block = make_block(case, dtype)
    layer = from_hf(block)
    assert isinstance(layer, moekit.MoE) and not layer.training
    x = _x(dtype)
    tol = TOL[dtype]
    torch.testing.assert_close(layer(x), block(x), atol=tol, rtol=0)
    hl, hidx, hw = _router_call(block, x)
    ml, midx, mw = _moekit_router_call(layer, x)
    torch.testing.assert_close(ml, hl, atol=tol, rtol=0)
    assert torch.equal(midx, hidx)
    torch.testing.assert_close(mw, hw.to(mw.dtype), atol=tol, rtol=0)
    # copied, not shared
    assert layer.router.gate.weight.data_ptr() != (block.router.classifier if case.startswith("switch")
                                                   else block.gate).weight.data_ptr()


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3", "switch"])
def test_from_hf_gradients_match(case):
    """Input gradients of a float64 loss through the HF block and through the converted layer (tol 1e-10)."""
    block = make_block(case, torch.float64)
    layer = from_hf(block)
    x1 = _x(torch.float64).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    w = torch.randn(x1.shape, dtype=torch.float64)
    (block(x1) * w).sum().backward()
    (layer(x2) * w).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-10, rtol=0)


def _cpu_experts_implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    gpu_only = {"deepgemm", "sonicmoe"}  # CUDA kernels (transformers 5.23)
    return ["eager"] + sorted(n for n in ALL_EXPERTS_FUNCTIONS.keys() if n not in gpu_only)


@pytest.mark.parametrize("impl", _cpu_experts_implementations())
@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
@torch.no_grad()
def test_matches_every_hf_experts_implementation(case, impl):
    block = make_block(case, torch.float32, impl=impl)
    assert block.experts.config._experts_implementation == impl
    layer = from_hf(block)
    x = _x(torch.float32, B=2, S=16)
    torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=0)


def _hf_weights(block) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in {**dict(block.named_parameters()), **dict(block.named_buffers())}.items()}


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_to_hf_round_trip(case):
    src = make_block(case, seed=0)
    layer = from_hf(src)
    x = _x(torch.float32)
    # into an existing block with other weights
    dst = make_block(case, seed=5)
    assert not torch.equal(next(dst.parameters()), next(src.parameters()))
    assert to_hf(layer, dst) is dst
    ws, wd = _hf_weights(src), _hf_weights(dst)
    assert ws.keys() == wd.keys()
    for k in ws:
        assert torch.equal(ws[k], wd[k]), k
    torch.testing.assert_close(dst(x), layer(x), atol=1e-5, rtol=0)
    # from a config: a new block of the layer's dtype
    config = _configs()[case]
    config._experts_implementation = "eager"
    fresh = to_hf(layer.double(), config)
    assert type(fresh) is type(src) and next(fresh.parameters()).dtype == torch.float64
    fresh.eval()
    torch.testing.assert_close(fresh(x.double()), layer(x.double()), atol=1e-10, rtol=0)
    # and back again
    again = from_hf(fresh)
    for (n1, p1), (n2, p2) in zip(layer.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_share_reuses_storage(case):
    block = make_block(case)
    layer = from_hf(block, share=True)
    x = _x(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=0)
    assert layer.router.gate.weight is block.gate.weight
    F_ = block.experts.down_proj.shape[-1]
    assert layer.experts.w13_E2FD is block.experts.gate_up_proj  # the same Parameter, HF's gate_up layout
    assert layer.experts.up_EFD.data_ptr() == block.experts.gate_up_proj[:, F_:].data_ptr()
    with torch.no_grad():
        layer.experts.up_EFD.mul_(2.0)
        torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=0)
    # gradients flow to the moekit parameters
    layer(x).sum().backward()
    assert layer.experts.w13_E2FD.grad is not None and layer.experts.w13_E2FD.grad.abs().sum() > 0


@torch.no_grad()
def test_switch_capacity_drops_like_hf():
    """expert_capacity is per sequence with position priority; transformers 5.x gives dropped tokens a zero output."""
    block = make_block("switch")  # capacity 3, 4 experts, 12 tokens per sequence: some experts overflow
    layer = from_hf(block)
    assert layer.dispatcher.spec == moekit.Capacity(capacity=3, per_sequence=True)
    x = _x(torch.float32, B=3, S=12)
    y_hf = block(x)
    out = layer.forward_with_aux(x)
    torch.testing.assert_close(out.y, y_hf, atol=1e-5, rtol=0)
    dropped_hf = (y_hf.abs().sum(-1) == 0).sum().item()
    assert dropped_hf > 0 and out.stats.dropped_fraction > 0
    assert dropped_hf == int(out.stats.routed_per_expert_E.sum() - out.stats.tokens_per_expert_E.sum())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock.*SwitchTransformersSparseMLP"):
        from_hf(nn.Linear(4, 4))
    assert not is_hf_moe_block(nn.Linear(4, 4)) and is_hf_moe_block(make_block("olmoe"))
    assert set(SUPPORTED_BLOCKS) >= {"MixtralSparseMoeBlock", "DeepseekV3MoE", "Qwen2MoeSparseMoeBlock"}
    layer = from_hf(make_block("qwen2_moe"))  # norm_topk_prob=False
    with pytest.raises(ValueError, match="normalize=False"):
        to_hf(layer, make_block("qwen2_moe", norm_topk_prob=True))
    with pytest.raises(ValueError, match="shared"):
        to_hf(layer, make_block("qwen3_moe", norm_topk_prob=False))
    with pytest.raises(ValueError, match="E=6"):
        to_hf(from_hf(make_block("olmoe")), make_block("mixtral", num_local_experts=4))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        to_hf(layer, transformers.BertConfig())
    with pytest.raises(ValueError, match="share=False"):
        from_hf(make_block("switch"), share=True)
    with pytest.raises(ValueError, match="Capacity"):
        to_hf(from_hf(make_block("switch")), make_block("switch", expert_capacity=5))
