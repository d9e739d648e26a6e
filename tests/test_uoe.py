"""Union of Experts (moekit.uoe) against dense layers and per-token references written from the equations.

Tolerances: float64, absolute 1e-10 on outputs and every gradient (unit-scale inputs).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit import MLP, SwiGLU
from moekit.uoe import HeadExperts, SlicedMLP, TokenSelection

TOL = 1e-10
B, L, D = 2, 7, 8


def _close(a, b, tol=TOL):
    assert torch.allclose(a, b, atol=tol, rtol=0), (a - b).abs().max()


def _randomize(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


# ---------------------------------------------------------------------------------------------------------- MLP
def _dense(kind):
    spec = MLP(hidden_dim=12, activation="gelu") if kind == "mlp" else SwiGLU(hidden_dim=12, bias=True)
    return _randomize(spec.build_dense(D).double())


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
@pytest.mark.parametrize("routed", [False, True])
def test_sliced_mlp_equals_dense(kind, routed):
    """Every slice and every token selected (k=E, capacity=1) == the dense MLP, outputs and gradients."""
    dense = _dense(kind)
    sel = TokenSelection(k=4, capacity=1.0) if routed else None
    sliced = SlicedMLP.from_dense(dense, 4, selection=sel)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y, y_ref = sliced(x), dense(x)
    _close(y, y_ref)
    gy = torch.randn_like(y)
    params = {n: p for n, p in sliced.named_parameters() if not n.startswith("gate")}  # gate: ranking only
    gx, *gs = torch.autograd.grad((y * gy).sum(), [x, *params.values()])
    grads = copy.deepcopy(sliced)  # same layout, parameters replaced by their gradients, read back as dense
    with torch.no_grad():
        for (n, _), g in zip(params.items(), gs):
            grads.get_parameter(n).copy_(g)
    names = [n for n, t in grads.dense_weights().items() if t is not None]
    gs = [grads.dense_weights()[n] for n in names]
    gx_ref, *gs_ref = torch.autograd.grad((y_ref * gy).sum(), [x, *[getattr(dense, n) for n in names]])
    _close(gx, gx_ref)
    for a, b in zip(gs, gs_ref):
        _close(a, b)


def test_sliced_mlp_from_linears():
    fc1, fc2 = nn.Linear(D, 16).double(), nn.Linear(16, D).double()
    sliced = SlicedMLP.from_linears(fc1, fc2, 4, activation="relu")
    x = torch.randn(3, D, dtype=torch.float64)
    _close(sliced(x), fc2(F.relu(fc1(x))))
    with pytest.raises(ValueError, match="do not chain"):
        SlicedMLP.from_linears(fc1, nn.Linear(12, D), 4)


def _ref_token_selection(m, x):
    """Per (sequence, slice) loop: scores from the gate equations, the top-C tokens, slice outputs added."""
    sel, E = m.selection, m.num_slices
    C = max(1, math.floor(sel.capacity * x.shape[1] + 1e-9))
    y = torch.zeros_like(x) + (0 if m.b2_D is None else m.b2_D)
    for b in range(x.shape[0]):
        g = (x[b] @ m.gate.weight.T + m.gate.bias).softmax(-1)  # (L, E)
        keep = torch.zeros_like(g)
        for t in range(x.shape[1]):
            for e in torch.topk(g[t], sel.k).indices.tolist():
                keep[t, e] = 1.0
        score = (g * keep).detach()
        for e in range(E):
            chosen = m.last_selected_BEC[b, e].tolist()
            assert len(set(chosen)) == C
            others = [t for t in range(x.shape[1]) if t not in chosen]
            if others:  # the chosen tokens are a top-C of this slice's scores
                assert min(score[c, e] for c in chosen) >= max(score[o, e] for o in others)
            for t in chosen:
                h = F.gelu(x[b, t] @ m.w1_EFD[e].T + m.b1_EF[e])
                out = h @ m.w2_EDF[e].T
                y[b, t] = y[b, t] + (out * g[t, e] * keep[t, e] if sel.weighted else out)
    return y


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("capacity", [0.5, 0.3])
def test_token_selection_matches_reference(weighted, capacity):
    m = _randomize(SlicedMLP(D, 16, 4, selection=TokenSelection(k=2, capacity=capacity, weighted=weighted)).double())
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_ref = _ref_token_selection(m, x)
    _close(y, y_ref)
    params = [x, *m.parameters()]
    gy = torch.randn_like(y)
    g = torch.autograd.grad((y * gy).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * gy).sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            _close(a, b)
    gate_grad = g[-2]
    assert (gate_grad is not None and gate_grad.abs().sum() > 0) == weighted  # released code: no gate gradient
    assert m.active_fraction(L) == max(1, math.floor(capacity * L)) / L


def test_token_selection_errors():
    with pytest.raises(ValueError, match="capacity"):
        TokenSelection(capacity=0.0)
    with pytest.raises(ValueError, match="larger than num_slices"):
        SlicedMLP(D, 16, 4, selection=TokenSelection(k=5))
    with pytest.raises(ValueError, match="multiple"):
        SlicedMLP(D, 10, 4)
    with pytest.raises(ValueError, match=r"\(batch, seq"):
        SlicedMLP(D, 16, 4, selection=TokenSelection())(torch.randn(3, D))


# ---------------------------------------------------------------------------------------------------- attention
def _torch_mha(bias=True):
    mha = nn.MultiheadAttention(D, 4, bias=bias, batch_first=True).double()
    return _randomize(mha, 0.4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("selective", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_head_experts_equal_torch_mha(causal, selective, bias):
    """Head experts (and SMHA with every head kept) == torch's MultiheadAttention, outputs and gradients."""
    mha = _torch_mha(bias)
    heads = HeadExperts.from_torch(mha, causal=causal, head_k=4 if selective else None)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1) if causal else None
    y_ref = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    y = heads(x)
    _close(y, y_ref)
    gy = torch.randn_like(y)
    gx, gq, gk, gv, go = torch.autograd.grad((y * gy).sum(), [x, heads.wq_HKD, heads.wk_HKD, heads.wv_HKD, heads.wo_HDK])
    gx_ref, g_in, g_out = torch.autograd.grad((y_ref * gy).sum(), [x, mha.in_proj_weight, mha.out_proj.weight])
    _close(gx, gx_ref)
    _close(torch.cat([gq, gk, gv]).reshape(3 * D, D), g_in)
    _close(go.permute(1, 0, 2).reshape(D, D), g_out)


def _ref_smha(m, x):
    """Per (sequence, head) loop: the tokens that kept head h attend among themselves (causally by position)."""
    H, K = m.num_heads, m.head_dim
    y = torch.zeros_like(x) + (0 if m.bo_D is None else m.bo_D)
    for b in range(x.shape[0]):
        g = (x[b] @ m.gate.weight.T + m.gate.bias).softmax(-1)
        kept = [set(torch.topk(g[t], m.head_k).indices.tolist()) for t in range(x.shape[1])]
        for h in range(H):
            S = [t for t in range(x.shape[1]) if h in kept[t]]
            q = {t: x[b, t] @ m.wq_HKD[h].T + m.bq_HK[h] for t in S}
            k = {t: x[b, t] @ m.wk_HKD[h].T + m.bk_HK[h] for t in S}
            v = {t: x[b, t] @ m.wv_HKD[h].T + m.bv_HK[h] for t in S}
            for t in S:
                keys = [s for s in S if (s <= t or not m.causal)]
                a = torch.stack([q[t] @ k[s] / math.sqrt(K) for s in keys]).softmax(0)
                o = sum(a[i] * v[s] for i, s in enumerate(keys)) @ m.wo_HDK[h].T
                y[b, t] = y[b, t] + (o * g[t, h] if m.weighted else o)
    return y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("head_k", [1, 2])
def test_selective_attention_matches_reference(causal, weighted, head_k):
    m = _randomize(HeadExperts(D, 4, causal=causal, head_k=head_k, weighted=weighted).double(), 0.5)
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_ref = _ref_smha(m, x)
    _close(y, y_ref)
    assert bool((m.last_keep_BLH.sum(-1) == head_k).all())
    params = [x, *m.parameters()]
    gy = torch.randn_like(y)
    g = torch.autograd.grad((y * gy).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * gy).sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            _close(a, b)


def test_head_experts_errors():
    with pytest.raises(ValueError, match="divide"):
        HeadExperts(10, 4)
    with pytest.raises(ValueError, match="head_k"):
        HeadExperts(D, 4, head_k=5)
    with pytest.raises(ValueError, match="batch_first"):
        HeadExperts.from_torch(nn.MultiheadAttention(D, 4))
