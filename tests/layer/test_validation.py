"""Bad input at the boundary gives a clear error naming the argument and the value (issue 15, items 6-8)."""

from __future__ import annotations

import inspect

import pytest
import torch

from moekit import AdaMoE, Capacity, Hash, MoE, MoEPP, SwiGLU, SwitchLoss, TopK, TopP
from moekit.layer import MoE as LayerMoE

D = 8


def test_dtype_mismatch_is_a_clear_error():
    layer = MoE(D, 4)  # float32
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(ValueError, match=f"input dtype {dtype} does not match the layer's parameter dtype"):
            layer(torch.randn(3, D, dtype=dtype))
    assert layer.double()(torch.randn(3, D, dtype=torch.float64)).dtype == torch.float64  # the documented cast


def test_integer_input_is_a_clear_error():
    with pytest.raises(ValueError, match="input must be floating point, got dtype torch.int64"):
        MoE(D, 4)(torch.ones(3, D, dtype=torch.long))


def test_autocast_input_is_allowed():
    layer = MoE(D, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, D)).shape == (3, D)


@pytest.mark.parametrize("make, match", [
    (lambda: TopK(k="2"), r"TopK: k must be an int, got '2'"),
    (lambda: TopK(k=2.5), r"TopK: k must be an int, got 2.5"),
    (lambda: TopK(normalize=1), r"TopK: normalize must be a bool"),
    (lambda: SwiGLU(hidden_dim=16.5), r"SwiGLU: hidden_dim must be an int or None, got 16.5"),
    (lambda: Capacity(capacity=2.5), r"Capacity: capacity must be an int or None, got 2.5"),
    (lambda: TopP(threshold="0.4"), r"TopP: threshold must be a number, got '0.4'"),
    (lambda: MoE(16.0, 4), r"MoE: dim must be an int, got 16.0"),
    (lambda: MoE(D, True), r"MoE: num_experts must be an int, got True"),
])
def test_spec_field_types(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_negative_coefficients_are_rejected():
    with pytest.raises(ValueError, match=r"SwitchLoss: coef must be >= 0, got -1"):
        SwitchLoss(coef=-1)
    assert SwitchLoss(coef=0).coef == 0  # zero is allowed (a disabled loss)


def test_adamoe_keeps_nan_rows_like_other_routers():
    x = torch.randn(3, D)
    x[1, 2] = float("nan")
    x[2, 3] = float("inf")
    for router in (AdaMoE(k=4, num_null=4), TopK(k=2), MoEPP()):
        torch.manual_seed(0)
        y = MoE(D, 4, router=router)(x)
        assert torch.isfinite(y[0]).all(), router
        assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all(), router


def test_hash_ids_are_validated():
    layer = MoE(D, 4, router=Hash())
    x = torch.randn(3, D)
    with pytest.raises(ValueError, match="token ids must be >= 0, got -1"):
        layer(x, token_ids=torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="integer tensor, got dtype torch.float32"):
        layer(x, token_ids=torch.tensor([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=r"must be in \[0, 10\), got 10"):
        MoE(D, 4, router=Hash(vocab_size=10))(x, token_ids=torch.tensor([0, 10, 2]))
    assert layer(x, token_ids=torch.tensor([0, 1, 2])).shape == (3, D)
    assert torch.equal(layer(x, task=torch.tensor([0, 1, 2])), layer(x, token_ids=torch.tensor([0, 1, 2])))  # old spelling


def test_task_to_a_router_that_ignores_it_raises():
    with pytest.raises(ValueError, match=r"task=1 given but the router TopKRouter is not task-conditioned"):
        MoE(D, 4)(torch.randn(3, D), task=1)
    with pytest.raises(ValueError, match="token_ids given but the router TopKRouter does not read them"):
        MoE(D, 4)(torch.randn(3, D), token_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="prev_logits given but the router TopKRouter does not read them"):
        MoE(D, 4)(torch.randn(3, D), prev_logits=torch.randn(3, 4))


def test_forward_is_plain_composition():
    """The layer never asks what kind of part it holds: no isinstance / getattr / hasattr in the forward path."""
    for fn in (LayerMoE.forward, LayerMoE.forward_with_aux, LayerMoE._context, LayerMoE._counted, LayerMoE._stats):
        src = inspect.getsource(fn)
        for probe in ("isinstance(self.", "getattr(", "hasattr("):
            assert probe not in src, (fn.__name__, probe)


def test_old_checkpoints_with_free_experts_in_the_router_load():
    """Compute-free experts moved from ``router.free_experts`` to the layer; old state dicts still load."""
    layer = MoE(D, 4, router=MoEPP(k=2)).eval()
    old = {k.replace("free_experts.", "router.free_experts.", 1) if k.startswith("free_experts.") else k: v
           for k, v in layer.state_dict().items()}
    assert any(k.startswith("router.free_experts.") for k in old)
    fresh = MoE(D, 4, router=MoEPP(k=2)).eval()
    fresh.load_state_dict(old)
    x = torch.randn(5, D)
    assert torch.equal(fresh(x), layer(x))
