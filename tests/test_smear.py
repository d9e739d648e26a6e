"""SMEAR and its baselines against per-example references written from the equations (moekit.merging).

Tolerances: float64, absolute 1e-10 on outputs and every gradient (inputs of unit scale); the one-hot invariant is
exact up to 1e-12.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MLP, SwiGLU
from moekit.merging import SMEAR, SMEARConfig, reinforce_loss, set_step

TOL = 1e-10
D, E, B, L = 6, 4, 5, 3


def _layer(routing, experts="mlp", **kw):
    spec = MLP(hidden_dim=5, activation="silu") if experts == "mlp" else SwiGLU(hidden_dim=5, bias=True)
    layer = SMEAR(D, E, experts=spec, routing=routing, **kw).double()
    with torch.no_grad():  # non-trivial values everywhere so every term is exercised
        for name, p in layer.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "weight" in name or "_E" in name else 0.3))
    return layer


def _ln(v, w, b, eps=1e-5):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return (v - mu) / torch.sqrt(var + eps) * w + b


def _ref_logits(layer, x_b):
    """u = LN(mean_l x_b); column-normalised R; logits = u R~ (+ b), one example."""
    r = layer.router
    u = _ln(x_b.mean(0), r.input_norm.weight, r.input_norm.bias)
    cols = [_ln(r.weight_DE[:, e], r.column_norm.weight, r.column_norm.bias) for e in range(E)]
    logits = torch.stack([u @ c for c in cols])
    return (logits if r.bias_E is None else logits + r.bias_E), u


def _ref_expert(layer, theta, x_ld):
    w_in, w2, b_in, b2 = theta  # w_in: the fused gate/up weight (2F, D) of GLU experts, else (F, D)
    h = x_ld @ w_in.T + (0 if b_in is None else b_in)
    if layer.experts.spec.glu:
        g, u = h.split(layer.experts.hidden_dim, dim=-1)
        h = F.silu(g) * u
    else:
        h = F.silu(h)
    return h @ w2.T + (0 if b2 is None else b2)


def _theta(layer, e):
    return [None if w is None else w[e] for w in layer._bank()]


def _merged_theta(layer, p):
    out = []
    for w in layer._bank():
        if w is None:
            out.append(None)
            continue
        acc = 0
        for e in range(E):
            acc = acc + p[e] * w[e]
        out.append(acc)
    return out


def _grads(out, params):
    gs = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def _check(layer, y, y_ref, x):
    assert torch.allclose(y, y_ref, atol=TOL, rtol=0), (y - y_ref).abs().max()
    gy = torch.randn_like(y)
    params = [x] + [p for p in layer.parameters()]
    g = _grads((y * gy).sum(), params)
    g_ref = _grads((y_ref * gy).sum(), params)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=TOL, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("experts", ["mlp", "swiglu"])
@pytest.mark.parametrize("router_bias", [False, True])
def test_smear_matches_per_example_merge(experts, router_bias):
    layer = _layer("smear", experts, router_bias=router_bias)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    rows = []
    for b in range(B):
        logits, _ = _ref_logits(layer, x[b])
        rows.append(_ref_expert(layer, _merged_theta(layer, logits.softmax(-1)), x[b]))
    _check(layer, y, torch.stack(rows), x)


def test_smear_without_column_norm_and_2d_input():
    layer = _layer("smear", normalize_router=False, router_input_norm=False)
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    rows = []
    for b in range(B):
        p = (x[b] @ layer.router.weight_DE).softmax(-1)
        rows.append(_ref_expert(layer, _merged_theta(layer, p), x[b : b + 1])[0])
    _check(layer, y, torch.stack(rows), x)


def test_smear_mask_pools_only_real_positions():
    layer = _layer("smear")
    x = torch.randn(B, L, D, dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 2] = mask[3, 1:] = False
    y = layer(x, mask=mask)
    for b in range(B):
        xb = x[b, mask[b]]
        r = layer.router
        u = _ln(xb.mean(0), r.input_norm.weight, r.input_norm.bias)
        cols = [_ln(r.weight_DE[:, e], r.column_norm.weight, r.column_norm.bias) for e in range(E)]
        p = torch.stack([u @ c for c in cols]).softmax(-1)  # from the raw parameters, not r.weight()
        assert torch.allclose(y[b], _ref_expert(layer, _merged_theta(layer, p), x[b]), atol=TOL, rtol=0)


@pytest.mark.parametrize("experts", ["mlp", "swiglu"])
def test_one_hot_smear_equals_tag_routing(experts):
    """The invariant: SMEAR with a one-hot router is tag routing (same bank, same output and gradients)."""
    smear = _layer("smear", experts)
    tag = SMEAR(D, E, experts=smear.experts.spec, routing="tag").double()
    tag.experts.load_state_dict(smear.experts.state_dict())
    task = torch.tensor([2, 0, 3, 3, 1])
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y_tag = tag(x, task=task)
    # 1) merged_forward with an explicit one-hot p
    y_merge = smear.merged_forward(x, F.one_hot(task, E).double())
    assert torch.allclose(y_merge, y_tag, atol=1e-12, rtol=0)
    # 2) the full SMEAR forward with its router replaced by one whose softmax is exactly one-hot
    smear.router.forward = lambda u: 1e4 * F.one_hot(task, E).double()
    y_full = smear(x)
    assert torch.equal(smear.last.probs_BE, F.one_hot(task, E).double())
    assert torch.allclose(y_full, y_tag, atol=1e-12, rtol=0)
    gy = torch.randn_like(y_tag)
    g_tag = torch.autograd.grad((y_tag * gy).sum(), [x, *tag.experts.parameters()])
    g_smear = torch.autograd.grad((y_full * gy).sum(), [x, *smear.experts.parameters()])
    for a, b in zip(g_tag, g_smear):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_tag_routing_reference_and_errors():
    layer = _layer("tag")
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    task = torch.tensor([1, 1, 0, 3, 2])
    y = layer(x, task=task)
    _check(layer, y, torch.stack([_ref_expert(layer, _theta(layer, int(task[b])), x[b]) for b in range(B)]), x)
    with pytest.raises(ValueError, match="needs task ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 4\)"):
        layer(x, task=torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="shape"):
        layer(x, task=torch.tensor([0, 1]))
    assert torch.equal(layer(x, task=2), layer(x, task=torch.full((B,), 2)))


def test_top1_scales_by_probability():
    layer = _layer("top1")
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    rows = []
    for b in range(B):
        p = _ref_logits(layer, x[b])[0].softmax(-1)
        e = int(p.argmax())
        rows.append(p[e] * _ref_expert(layer, _theta(layer, e), x[b]))
    _check(layer, y, torch.stack(rows), x)


def test_ensemble_sums_all_experts():
    layer = _layer("ensemble")
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    rows = []
    for b in range(B):
        p = _ref_logits(layer, x[b])[0].softmax(-1)
        rows.append(sum(p[e] * _ref_expert(layer, _theta(layer, e), x[b]) for e in range(E)))
    _check(layer, y, torch.stack(rows), x)


def test_st_gumbel_forward_gradient_and_temperature():
    layer = _layer("st_gumbel", tau0=10.0, tau_min=0.5, tau_decay=1e-2).train()
    g = -torch.log(-torch.log(torch.rand(B, E, dtype=torch.float64)))
    layer._gumbel = lambda like: g
    set_step(layer, 100)
    tau = max(10.0 * math.exp(-1e-2 * 100), 0.5)
    assert layer.temperature == pytest.approx(tau, rel=1e-12)
    set_step(layer, 10**6)
    assert layer.temperature == 0.5
    set_step(layer, 100)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    rows = []
    for b in range(B):
        soft = ((_ref_logits(layer, x[b])[0] + g[b]) / tau).softmax(-1)
        e = int(soft.argmax())
        rows.append(_ref_expert(layer, _theta(layer, e), x[b]) * (1 - soft[e].detach() + soft[e]))
    y_ref = torch.stack(rows)
    _check(layer, y, y_ref, x)
    assert torch.allclose(y, torch.stack([_ref_expert(layer, _theta(layer, int(e)), x[b]) for b, e in enumerate(layer.last.expert_B)]), atol=TOL)
    layer.eval()  # eval: argmax of the logits, no noise, no scaling
    y_eval = layer(x)
    for b in range(B):
        e = int(_ref_logits(layer, x[b])[0].argmax())
        assert torch.allclose(y_eval[b], _ref_expert(layer, _theta(layer, e), x[b]), atol=TOL)


def test_reinforce_forward_and_loss_helper():
    layer = _layer("reinforce").train()
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    e_B = layer.last.expert_B
    y_ref = torch.stack([_ref_expert(layer, _theta(layer, int(e_B[b])), x[b]) for b in range(B)])
    assert torch.allclose(y, y_ref, atol=TOL, rtol=0)
    ex_loss = (y**2).mean(dim=(1, 2))
    loss = reinforce_loss(layer, ex_loss, policy_coef=0.3, entropy_coef=0.2, baseline_coef=0.1)
    # reference from the equations
    terms = []
    for b in range(B):
        logits, u = _ref_logits(layer, x[b])
        p = logits.softmax(-1)
        base = layer.baseline(u.detach())[0]
        A = ex_loss[b].detach() - base
        huber = 0.5 * A**2 if abs(float(A.detach())) <= 1 else abs(A) - 0.5
        terms.append(0.3 * torch.log(p[e_B[b]]) * A.detach() + 0.2 * -(p * p.log()).sum() + 0.1 * huber)
    ref = torch.stack(terms).mean()
    assert torch.allclose(loss, ref, atol=TOL, rtol=0)
    params = [p for n, p in layer.named_parameters() if not n.startswith("experts")]
    for a, b in zip(_grads(loss, params), _grads(ref, params)):
        assert torch.allclose(a, b, atol=TOL, rtol=0)
    assert layer.router.weight_DE.grad is None  # helper builds a graph only
    with pytest.raises(ValueError, match="one loss per example"):
        reinforce_loss(layer, ex_loss[:2])


def test_reinforce_samples_follow_router():
    torch.manual_seed(1)
    layer = SMEAR(4, 3, routing="reinforce").train()
    layer.router.forward = lambda u: torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(u.shape[0], 3)
    layer(torch.randn(20000, 4))
    freq = torch.bincount(layer.last.expert_B, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.02)


def test_expert_dropout_renormalises_and_only_in_training():
    torch.manual_seed(0)
    layer = SMEAR(D, E, routing="smear", expert_dropout=0.5).double().train()
    x = torch.randn(64, L, D, dtype=torch.float64)
    layer(x)
    p = layer.last.probs_BE
    assert torch.allclose(p.sum(-1), torch.ones(64, dtype=torch.float64), atol=1e-12)
    dropped = p < 1e-8
    assert 0.3 < float(dropped.double().mean()) < 0.7
    layer.eval()
    layer(x)
    assert bool((layer.last.probs_BE > 1e-8).all())


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown routing"):
        SMEARConfig(routing="nope")
    with pytest.raises(ValueError, match="expert_dropout"):
        SMEAR(4, 2, expert_dropout=1.0)
    with pytest.raises(ValueError, match=r"expected input"):
        SMEAR(4, 2)(torch.randn(2, 5))
    d = SMEARConfig(routing="top1", expert_dropout=0.1).to_dict()
    assert d["type"] == "smear" and d["routing"] == "top1"
