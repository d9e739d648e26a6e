"""The routers and experts the Hugging Face full swaps added, each against a per-token loop written from its equations
(float64, outputs and gradients within 1e-10): TopKSoftmax (gpt-oss), SparseMixer (PhiMoE), TopKFree (LongCat-Flash's
zero-computation experts), ClampedSwiGLU (gpt-oss's experts, both gate/up layouts)."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.experts import ClampedSwiGLU
from moekit.routers import SparseMixer, TopKFree, TopKSoftmax

D, E, T = 12, 6, 9
TOL = 1e-10


def _close(a, b, what):
    err = float((a - b).detach().abs().max())
    assert err <= TOL, f"{what}: max error {err:.1e}"


def _layer(router, experts=None, num_experts=E, seed=0):
    torch.manual_seed(seed)
    layer = moekit.MoE(D, num_experts, router=router, experts=experts or moekit.SwiGLU(hidden_dim=8)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.5)
    return layer.eval()


def _swiglu(bank, e, x_D):
    g = bank.w13_E2FD[e, : bank.hidden_dim] @ x_D
    u = bank.w13_E2FD[e, bank.hidden_dim:] @ x_D
    return bank.w2_EDF[e] @ (torch.nn.functional.silu(g) * u)


def _check(layer, reference, x_TD):
    """Layer output and the gradients of every parameter and of x equal the reference's (same r-weighted loss)."""
    x1 = x_TD.clone().requires_grad_(True)
    x2 = x_TD.clone().requires_grad_(True)
    y = layer(x1)
    y_ref = torch.stack([reference(x2[t], t) for t in range(x2.shape[0])])
    _close(y, y_ref, "output")
    r = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    g = torch.autograd.grad((y * r).sum(), [x1, *params], allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * r).sum(), [x2, *params], allow_unused=True)
    for (name, _), a, b in zip([("x", None), *layer.named_parameters()], g, g_ref):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        _close(a, b, f"gradient of {name}")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_softmax_matches_the_equations(k):
    layer = _layer(TopKSoftmax(k=k, router_bias=True, fp32=False))
    gate, bank = layer.router.gate, layer.experts

    def reference(x_D, t):
        l_E = gate.weight @ x_D + gate.bias
        chosen = sorted(range(E), key=lambda e: -float(l_E[e].detach()))[:k]
        z = sum(torch.exp(l_E[e]) for e in chosen)
        return sum(torch.exp(l_E[e]) / z * _swiglu(bank, e, x_D) for e in chosen)

    _check(layer, reference, torch.randn(T, D, dtype=torch.float64))


def test_topk_softmax_selection_bias_selects_only():
    layer = _layer(TopKSoftmax(k=2, router_bias=True, fp32=False), seed=1)
    layer.router.bias_E = torch.zeros(E, dtype=torch.float64)
    x = torch.randn(T, D, dtype=torch.float64)
    before = layer.forward_with_aux(x).assignment
    layer.router.bias_E[3] = 1e3  # expert 3 is chosen by every token; the weights stay a softmax of the logits
    a = layer.forward_with_aux(x).assignment
    idx_TK = a.expert_N.view(2, T).t()
    assert (idx_TK == 3).any(1).all() and not (before.expert_N.view(2, T).t() == 3).all()
    l_TE = a.logits_TE
    w_TK = a.weight_N.view(2, T).t()
    _close(w_TK, l_TE.gather(1, idx_TK).softmax(-1), "biased selection weights")
    with pytest.raises(ValueError, match="score must be 'softmax'"):
        TopKSoftmax(score="sigmoid")


def _sparsemixer_eval_weights(l_E, k, eps):
    """PhiMoE's sparsemixer at evaluation, token by token: pass j takes the best expert not yet chosen; its weight is
    its softmax over the experts within a relative 2*eps of it (the chosen ones excluded)."""
    chosen, weights = [], []
    for _ in range(k):
        rest = [e for e in range(E) if e not in chosen]
        best = max(rest, key=lambda e: float(l_E[e].detach()))
        lv = l_E.detach()
        window = [e for e in rest if float((lv[best] - lv[e]) / max(abs(float(lv[e])), float(lv[best]))) <= 2 * eps]
        z = sum(torch.exp(l_E[e]) for e in window)
        chosen.append(best)
        weights.append(torch.exp(l_E[best]) / z)
    return chosen, weights


@pytest.mark.parametrize("eps", [0.01, 0.3, 2.0])
def test_sparsemixer_eval_matches_the_equations(eps):
    layer = _layer(SparseMixer(k=2, eps=eps))
    gate, bank = layer.router.gate, layer.experts

    def reference(x_D, t):
        chosen, weights = _sparsemixer_eval_weights(gate.weight @ x_D, 2, eps)
        return sum(w * _swiglu(bank, e, x_D) for e, w in zip(chosen, weights))

    _check(layer, reference, torch.randn(T, D, dtype=torch.float64))


def test_sparsemixer_training_weights_and_heun_gradient():
    """Training: sampled experts inside the window, weights c * p with c in {1, 0.3333}, and the logits' gradient is
    sum_j g_j * p_j(chosen_j) * (onehot(chosen_j) - p_j)."""
    eps = 0.3
    router = SparseMixer(k=2, eps=eps).build(D, E).double().train()
    torch.manual_seed(0)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.5)
    x = torch.randn(64, D, dtype=torch.float64)
    torch.manual_seed(5)
    a = router(x)
    idx_TK = a.expert_N.view(2, -1).t()
    w_TK = a.weight_N.view(2, -1).t()
    l_TE = a.logits_TE
    r_TK = torch.randn_like(w_TK)
    (g_TE,) = torch.autograd.grad((w_TK * r_TK).sum(), [l_TE])
    sampled_off_argmax = 0
    for t in range(l_TE.shape[0]):
        l_E = l_TE[t].detach()
        grad_ref = torch.zeros(E, dtype=torch.float64)
        chosen: list[int] = []
        for j in range(2):
            rest = [e for e in range(E) if e not in chosen]
            mx = max(float(l_E[e]) for e in rest)
            window = [e for e in rest if (mx - float(l_E[e])) / max(abs(float(l_E[e])), mx) <= 2 * eps]
            e = int(idx_TK[t, j])
            assert e in window
            p = torch.zeros(E, dtype=torch.float64)
            p[window] = torch.softmax(l_E[window], 0)
            c = float(w_TK[t, j]) / float(p[e])
            assert abs(c - 1.0) < 1e-12 or abs(c - 0.3333) < 1e-7  # 0.3333 rounded to float32, as in PhiMoE
            sampled_off_argmax += e != window[int(p[window].argmax())]
            onehot = torch.zeros(E, dtype=torch.float64)
            onehot[e] = 1.0
            grad_ref += r_TK[t, j] * p[e] * (onehot - p)
            chosen.append(e)
        _close(g_TE[t], grad_ref, f"token {t} logits gradient")
    assert sampled_off_argmax > 0  # training samples: not always the argmax


def test_topk_free_matches_the_equations():
    """Top-k over 5 FFN experts and 3 compute-free ones (1 copy, 2 zero), softmax, selection bias, scale."""
    spec = TopKFree(k=3, score="softmax", normalize=False, scale=1.5, correction_bias=True, copy=1, zero=2)
    layer = _layer(spec, num_experts=5)
    gate, bank = layer.router.gate, layer.experts
    with torch.no_grad():
        layer.router.bias_E.copy_(torch.randn(8, dtype=torch.float64) * 0.3)
    bias = layer.router.bias_E

    def reference(x_D, t):
        p_E = torch.softmax(gate.weight @ x_D, 0)
        chosen = sorted(range(8), key=lambda e: -float(p_E[e].detach() + bias[e]))[:3]
        out = torch.zeros(D, dtype=torch.float64)
        for e in chosen:
            if e < 5:
                out = out + 1.5 * p_E[e] * _swiglu(bank, e, x_D)
            elif e == 5:  # the copy expert
                out = out + 1.5 * p_E[e] * x_D
        return out

    x = torch.randn(32, D, dtype=torch.float64)
    a = layer.forward_with_aux(x).assignment
    assert a.num_free_experts == 3 and (a.expert_N == 5).any() and (a.expert_N > 5).any() and (a.expert_N < 5).any()
    _check(layer, reference, x)
    with pytest.raises(ValueError, match="AuxFree"):
        moekit.MoE(D, 5, router=spec, balance=moekit.AuxFree())
    assert moekit.MoE(D, 5, router=TopKFree(k=2)).free_experts is None


@pytest.mark.parametrize("interleaved", [False, True])
def test_clamped_swiglu_matches_the_equations(interleaved):
    spec = ClampedSwiGLU(hidden_dim=7, alpha=1.702, limit=0.8, interleaved=interleaved)
    layer = _layer(moekit.TopK(k=2), experts=spec)
    gate, bank = layer.router.gate, layer.experts
    Fh = 7

    def expert(e, x_D):
        h = bank.w13_E2FD[e] @ x_D + bank.b13_E2F[e]
        g, u = (h[0::2], h[1::2]) if interleaved else (h[:Fh], h[Fh:])
        g = torch.clamp(g, max=0.8)
        u = torch.clamp(u, min=-0.8, max=0.8)
        return bank.w2_EDF[e] @ ((u + 1) * g * torch.sigmoid(1.702 * g)) + bank.b2_ED[e]

    def reference(x_D, t):
        p_E = torch.softmax(gate.weight @ x_D, 0)
        chosen = sorted(range(E), key=lambda e: -float(p_E[e].detach()))[:2]
        z = sum(p_E[e] for e in chosen)
        return sum(p_E[e] / z * expert(e, x_D) for e in chosen)

    x = torch.randn(T, D, dtype=torch.float64)
    _check(layer, reference, x)
    with torch.no_grad():  # the few-rows decode path and the per-expert view agree with the grouped path
        y = layer(x[:2])
        _close(y, torch.stack([reference(x[t], t) for t in range(2)]), "decode path")
        _close(bank.expert_forward(0, x), torch.stack([expert(0, x[t]) for t in range(T)]), "expert_forward")
    assert bank.gate_EFD.shape == bank.up_EFD.shape == (E, Fh, D)
    with pytest.raises(ValueError, match="dense"):
        moekit.MoE(D, E, experts=spec, shared_experts=spec)
    with pytest.raises(ValueError, match="activation must be 'silu'"):
        ClampedSwiGLU(activation="gelu")


@pytest.mark.parametrize("spec", [TopKSoftmax(k=2, router_bias=True), SparseMixer(eps=0.1), TopKFree(k=2, copy=1),
                                  ClampedSwiGLU(hidden_dim=4, interleaved=True)])
def test_specs_round_trip_through_config_dicts(spec):
    kind = "experts" if isinstance(spec, ClampedSwiGLU) else "router"
    layer = moekit.MoE(D, E, **{kind: spec})
    back = moekit.MoE.from_config(layer.config.to_dict())
    assert getattr(back.config, kind) == spec
