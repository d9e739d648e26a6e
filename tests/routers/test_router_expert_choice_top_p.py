"""Expert-choice routing and dynamic top-p routing against per-token references from the equations.

Tolerance: float64, absolute 1e-10 (outputs and every gradient).
"""

import math

import pytest
import torch
from _routing_methods_ref import TOL64, assert_matches_reference, swiglu_expert

from moekit import MoE, SwiGLU, SwitchLoss
from moekit.routers import EntropyLoss, ExpertChoice, TopP

D, F_ = 8, 6


def _layer(router, E=4, **kw):
    return MoE(D, E, router=router, experts=SwiGLU(hidden_dim=F_, impl="loop"), **kw).double().eval()


# ----------------------------------------------------------------------------------------------- expert choice
def expert_choice_reference(layer, x):
    """For each expert: rank the tokens by S[:, e] = softmax_e(x W_g)[:, e], take the top C, add S[t,e] FFN_e(x_t)."""
    x_TD = x.reshape(-1, D)
    T, E = x_TD.shape[0], layer.num_experts
    S = torch.stack([torch.softmax(layer.router.gate.weight @ x_TD[t], 0) for t in range(T)])
    spec = layer.router.spec
    C = min(T, spec.capacity if spec.capacity is not None else math.ceil(spec.capacity_factor * T / E))
    rows = [x_TD.new_zeros(D) for _ in range(T)]
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: -float(S[t, e].detach()))
        for t in ranked[:C]:
            rows[t] = rows[t] + S[t, e] * swiglu_expert(layer.experts, e, x_TD[t])
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("spec", [ExpertChoice(), ExpertChoice(capacity_factor=0.5), ExpertChoice(capacity=3)],
                         ids=["c=2", "c=0.5", "C=3"])
def test_expert_choice_equals_reference(spec):
    layer = _layer(spec)
    assert_matches_reference(layer, torch.randn(2, 7, D, dtype=torch.float64), expert_choice_reference)


def test_expert_choice_loads_are_exactly_capacity():
    layer = _layer(ExpertChoice(capacity_factor=1.0), E=4)
    stats = layer.forward_with_aux(torch.randn(20, D, dtype=torch.float64)).stats
    assert stats.tokens_per_expert_E.tolist() == [5, 5, 5, 5]
    assert stats.experts_per_token == 1.0


@pytest.mark.parametrize("spec", [ExpertChoice(capacity_factor=4.0), ExpertChoice(capacity=1000)])
def test_expert_choice_full_capacity_gives_every_expert_every_token(spec):
    """Capacity covering every token: every expert takes all T tokens, so the layer is the soft mixture
    sum_e S[t, e] FFN_e(x_t) over all experts."""
    layer = _layer(spec, E=4)
    x = torch.randn(9, D, dtype=torch.float64)
    out = layer.forward_with_aux(x)
    assert out.stats.tokens_per_expert_E.tolist() == [9] * 4
    pairs = set(zip(out.assignment.token_N.tolist(), out.assignment.expert_N.tolist()))
    assert pairs == {(t, e) for t in range(9) for e in range(4)}
    S = torch.softmax(x @ layer.router.gate.weight.T, -1)
    soft = torch.stack([sum(S[t, e] * swiglu_expert(layer.experts, e, x[t]) for e in range(4)) for t in range(9)])
    assert (out.y - soft).abs().max() <= TOL64


def test_expert_choice_is_not_causal():
    """A later token can take an earlier token's slot: the earlier output depends on the future."""
    layer = _layer(ExpertChoice(capacity=1), E=2)
    x = torch.randn(4, D, dtype=torch.float64)
    e0 = int(torch.softmax(layer.router.gate.weight @ x[0], 0).argmax())
    x[1:] = 0.0  # zero logits: S = 1/2, below token 0's score for its preferred expert
    a = layer.forward_with_aux(x).assignment
    assert 0 in a.token_N[a.expert_N == e0].tolist()
    x_future = x.clone()
    x_future[3] = 50.0 * x[0]  # the same direction, sharper: a higher score for e0
    b = layer.forward_with_aux(x_future)
    assert 0 not in b.assignment.token_N[b.assignment.expert_N == e0].tolist()
    assert not torch.allclose(layer(x)[0], b.y[0])


@pytest.mark.parametrize("kw", [dict(capacity_factor=0.0), dict(capacity_factor=-1.0), dict(capacity=0),
                                dict(capacity=-2)])
def test_expert_choice_bad_capacity(kw):
    with pytest.raises(ValueError, match="capacity"):
        ExpertChoice(**kw)


# ---------------------------------------------------------------------------------------------------- top-p
def top_p_reference(layer, x):
    """Per token: walk the experts by descending probability, adding each, until the running sum exceeds p_thr;
    each kept expert contributes p_e FFN_e(x) (raw probability)."""
    x_TD = x.reshape(-1, D)
    thr = layer.router.spec.threshold
    rows = []
    for t in range(x_TD.shape[0]):
        p = torch.softmax(layer.router.gate.weight @ x_TD[t], 0)
        y, cum = x_TD.new_zeros(D), 0.0
        for e in sorted(range(layer.num_experts), key=lambda e: -float(p[e].detach())):
            y = y + p[e] * swiglu_expert(layer.experts, e, x_TD[t])
            cum += float(p[e].detach())
            if cum > thr:
                break
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.7])
def test_top_p_equals_reference(threshold):
    layer = _layer(TopP(threshold=threshold), E=6)
    with torch.no_grad():
        layer.router.gate.weight.mul_(3.0)  # peakier routing so that k varies from token to token
    assert_matches_reference(layer, torch.randn(3, 7, D, dtype=torch.float64), top_p_reference)
    k_T = torch.bincount(layer.forward_with_aux(torch.randn(40, D, dtype=torch.float64)).assignment.token_N)
    assert k_T.min() >= 1


def test_top_p_threshold_one_selects_all_experts():
    layer = _layer(TopP(threshold=1.0), E=5)
    with torch.no_grad():
        layer.router.gate.weight.mul_(30.0)  # very peaked: the tail mass rounds away in a cumulative sum
    out = layer.forward_with_aux(torch.randn(16, D, dtype=torch.float64))
    assert out.stats.experts_per_token == 5.0
    assert out.stats.tokens_per_expert_E.tolist() == [16] * 5


def test_top_p_mean_experts_per_token_grows_with_threshold():
    x = torch.randn(64, D, dtype=torch.float64)
    layer = _layer(TopP(threshold=0.4), E=8)
    means = []
    for thr in (1e-6, 0.4, 0.8):
        layer.router.spec = TopP(threshold=thr)
        means.append(layer.forward_with_aux(x).stats.experts_per_token)
    assert means[0] == 1.0  # the first expert always passes a tiny threshold
    assert means[0] < means[1] < means[2] < 8


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.0001, 2.0])
def test_top_p_bad_threshold(threshold):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        TopP(threshold=threshold)


def test_top_p_max_k_caps_experts():
    layer = _layer(TopP(threshold=1.0, max_k=2), E=5)
    assert layer.forward_with_aux(torch.randn(10, D, dtype=torch.float64)).stats.experts_per_token == 2.0


def test_entropy_loss_equals_formula_and_gradient():
    layer = _layer(TopP(threshold=0.4), E=6, balance=(SwitchLoss(coef=0.01), EntropyLoss(coef=1e-4)))
    x = torch.randn(12, D, dtype=torch.float64)
    loss = layer.forward_with_aux(x).losses["entropy"]
    layer.zero_grad()
    loss.backward()
    g_fast = layer.router.gate.weight.grad.clone()
    W = layer.router.gate.weight
    layer.zero_grad()
    ent = []
    for t in range(12):
        p = torch.softmax(W @ x[t], 0)
        ent.append(-sum(p[e] * torch.log(p[e]) for e in range(6)))
    ref = 1e-4 * torch.stack(ent).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-14
    assert (g_fast - W.grad).abs().max() <= 1e-14
