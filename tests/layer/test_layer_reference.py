"""The fast MoE path equals the per-token reference loop, outputs and every gradient.

Tolerances: float64 <= 1e-10 (split-loop expert impl), float32 <= 1e-5 (grouped_mm expert impl), both absolute on
inputs of unit scale.
"""

import itertools

import pytest
import torch

from moekit import MLP, Capacity, Dropless, MoE, SwiGLU, TopK
from moekit.reference import moe_reference

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

CASES = [
    dict(k=k, E=E, score=score, normalize=norm, dispatch=disp, shared=shared)
    for k, E, score, norm, disp, shared in itertools.product(
        (1, 2, 3), (4, 8), ("softmax", "sigmoid"), (True, False), ("dropless", "capacity", "score"), (False, True)
    )
    if not (k == 3 and E == 4 and disp == "score")  # thin the sweep a little; every option still appears
]


def _dispatch(name):
    return {
        "dropless": Dropless(),
        "capacity": Capacity(factor=0.75),
        "score": Capacity(factor=0.75, drop="score"),
    }[name]


def _layer(case, dtype, impl="auto", experts="swiglu"):
    spec = SwiGLU(hidden_dim=8, impl=impl) if experts == "swiglu" else MLP(hidden_dim=12, activation="gelu", impl=impl)
    layer = MoE(
        8,
        case["E"],
        router=TopK(k=case["k"], score=case["score"], normalize=case["normalize"]),
        experts=spec,
        shared_experts=SwiGLU(hidden_dim=4) if case["shared"] else None,
        shared_gate=case["shared"],
        dispatch=_dispatch(case["dispatch"]),
    ).to(dtype)
    if experts == "mlp":  # non-zero biases so they are exercised
        with torch.no_grad():
            for b in (layer.experts.b1_EF, layer.experts.b2_ED):
                b.normal_()
    return layer.eval()


def _grads(layer, x, fn):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(layer, x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    grads = {"x": x.grad.clone()}
    for name, p in layer.named_parameters():
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return y.detach(), grads


def _compare(layer, x, tol):
    y_fast, g_fast = _grads(layer, x, lambda m, x: m(x))
    y_ref, g_ref = _grads(layer, x, moe_reference)
    assert torch.allclose(y_fast, y_ref, atol=tol, rtol=0), (y_fast - y_ref).abs().max()
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        err = (g_fast[name] - g_ref[name]).abs().max().item()
        assert err <= tol, f"grad {name}: max abs error {err:.3g} > {tol}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fast_path_equals_reference(case, dtype):
    layer = _layer(case, dtype)
    x = torch.randn(2, 7, 8, dtype=dtype)
    _compare(layer, x, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_mlp_experts_with_bias_equal_reference(dtype):
    case = dict(k=2, E=4, score="softmax", normalize=False, dispatch="capacity", shared=False)
    _compare(_layer(case, dtype, experts="mlp"), torch.randn(3, 5, 8, dtype=dtype), TOL[dtype])


def test_grouped_mm_equals_loop_impl():
    """The two expert implementations agree (float32, 1e-5), outputs and grads."""
    case = dict(k=2, E=8, score="softmax", normalize=True, dispatch="dropless", shared=False)
    a = _layer(case, torch.float32, impl="grouped_mm")
    b = _layer(case, torch.float32, impl="loop")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 9, 8)
    ya, ga = _grads(a, x, lambda m, x: m(x))
    yb, gb = _grads(b, x, lambda m, x: m(x))
    assert torch.allclose(ya, yb, atol=1e-5)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5), name


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_group_limited_and_correction_bias_equal_reference(score):
    """DeepSeek-V3 routing: group-limited top-k with a selection-only bias and a routed scaling factor (f64, 1e-10)."""
    layer = MoE(
        8, 16,
        router=TopK(k=4, score=score, normalize=True, scale=2.5, n_group=4, topk_group=2, correction_bias=True),
        experts=SwiGLU(hidden_dim=6), shared_experts=SwiGLU(hidden_dim=12),
    ).double().eval()
    with torch.no_grad():
        layer.router.bias_E.normal_(0, 0.1)
    _compare(layer, torch.randn(2, 9, 8, dtype=torch.float64), 1e-10)


def test_group_limited_selection_stays_in_chosen_groups():
    layer = MoE(8, 16, router=TopK(k=4, n_group=4, topk_group=2, score="sigmoid")).eval()
    a = layer.forward_with_aux(torch.randn(50, 8)).assignment
    groups = (a.expert_N // 4).reshape(4, 50).t()  # (T, k)
    assert all(len(set(row.tolist())) <= 2 for row in groups)


def test_correction_bias_changes_selection_not_weights():
    layer = MoE(8, 4, router=TopK(k=1, correction_bias=True, normalize=False)).double().eval()
    x = torch.randn(30, 8, dtype=torch.float64)
    with torch.no_grad():
        layer.router.bias_E.copy_(torch.tensor([10.0, 0, 0, 0]))  # everything goes to expert 0
    a = layer.forward_with_aux(x).assignment
    assert (a.expert_N == 0).all()
    probs = a.scores_TE[:, 0]
    assert torch.allclose(a.weight_N, probs)  # weights are the unbiased probabilities


@pytest.mark.parametrize("dispatch", ["dropless", "capacity", "score"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_weight_at_input_equals_reference(dispatch, k, dtype):
    """weight_at="input" (Llama 4): y_t = sum_e f_e(w_te x_t), on the grid plan (dropless), the sorted plan
    (capacity) and the decode path (no_grad, few rows); outputs and every gradient against the per-token loop."""
    spec = {"dropless": Dropless(weight_at="input"), "capacity": Capacity(factor=0.75, weight_at="input"),
            "score": Capacity(factor=0.75, drop="score", weight_at="input")}[dispatch]
    layer = MoE(8, 4, router=TopK(k=k, score="sigmoid", normalize=False), experts=SwiGLU(hidden_dim=8),
                shared_experts=SwiGLU(hidden_dim=4), dispatch=spec).to(dtype).eval()
    assert layer.dispatcher.weight_at == "input"
    _compare(layer, torch.randn(2, 7, 8, dtype=dtype), TOL[dtype])
    with torch.no_grad():  # the decode path: a few tokens, and one token (two-op plan, one-product combine)
        for x in (torch.randn(1, 3, 8, dtype=dtype), torch.randn(1, 1, 8, dtype=dtype)):
            torch.testing.assert_close(layer(x), moe_reference(layer, x), atol=TOL[dtype], rtol=0)
        # and it is a different function from weighting the outputs
        as_output = MoE.from_config({**layer.config.to_dict(), "dispatch": Dropless().to_dict()}).to(dtype).eval()
        as_output.load_state_dict(layer.state_dict())
        x = torch.randn(2, 7, 8, dtype=dtype)
        if dispatch == "dropless":
            assert (as_output(x) - layer(x)).abs().max() > 1e-3


def test_weight_at_validation_and_round_trip():
    from moekit.routers.topk_free import TopKFree

    with pytest.raises(ValueError, match="weight_at must be one of 'output', 'input'"):
        Dropless(weight_at="middle")
    with pytest.raises(ValueError, match="Capacity: weight_at"):
        Capacity(weight_at="both")
    layer = MoE(8, 4, dispatch=Capacity(factor=2.0, weight_at="input"))
    again = MoE.from_config(layer.config.to_dict())
    assert again.config.dispatch == Capacity(factor=2.0, weight_at="input") and again.dispatcher.weight_at == "input"
    assert "weight_at=input" in repr(again.dispatcher)
    with pytest.raises(ValueError, match="weight_at='input' cannot be combined with compute-free experts"):
        MoE(8, 4, router=TopKFree(k=2, copy=1), dispatch=Dropless(weight_at="input"))
