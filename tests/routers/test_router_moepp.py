"""MoE++ (zero-computation experts, gating residuals, heterogeneous balance) against a per-token reference.

Tolerance: float64, absolute 1e-10 (outputs and every gradient), 1e-12 for the top-k invariant.
"""

import pytest
import torch
from _routing_methods_ref import TOL64, assert_matches_reference, swiglu_expert

from moekit import MoE, SwiGLU, TopK
from moekit.routers import HeteroBalanceLoss, MoEPP

D, F_, N = 8, 6, 4


def _layer(spec=None, **kw):
    spec = spec or MoEPP(k=2, constant=2, copy=1, zero=1)
    return MoE(D, N, router=spec, experts=SwiGLU(hidden_dim=F_, impl="loop"), **kw).double().eval()


def _logits_ref(router, x_D, prev_D=None):
    if isinstance(router.gate, torch.nn.Linear):
        l = router.gate.weight @ x_D
    else:
        l = router.gate[2].weight @ torch.tanh(router.gate[0].weight @ x_D)
    if prev_D is not None:
        l = l + router.residual.weight @ prev_D
    return l


def _zc_expert(zc, slot, x_D):
    """Zero-computation expert ``slot`` from the equations: constant a1 x + a2 v, copy x, zero 0."""
    if slot < zc.num_constant:
        a = torch.softmax(zc.wc_C2D[slot] @ x_D, 0)
        return a[0] * x_D + a[1] * zc.v_CD[slot]
    if slot < zc.num_constant + zc.num_copy:
        return x_D
    return torch.zeros_like(x_D)


def moepp_reference(layer, x, prev=None):
    """Per token: p = softmax(l), top-k, zero-expert weights set to 0, the rest renormalised, y = sum g_j E_j(x)."""
    r = layer.router
    x_TD = x.reshape(-1, D)
    E_all, first_zero = r.num_experts, r.first_zero
    rows = []
    for t in range(x_TD.shape[0]):
        p = torch.softmax(_logits_ref(r, x_TD[t], None if prev is None else prev[t]), 0)
        chosen = sorted(range(E_all), key=lambda e: -float(p[e].detach()))[: r.spec.k]
        g = [p[e] if e < first_zero else p[e] * 0 for e in chosen]
        total = sum(g)
        y = x_TD.new_zeros(D)
        for e, w in zip(chosen, g):
            out = swiglu_expert(layer.experts, e, x_TD[t]) if e < N else _zc_expert(layer.free_experts, e - N, x_TD[t])
            y = y + (w / (total + 1e-20)) * out
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("hidden", [8, None], ids=["2-layer-router", "linear-router"])
def test_moepp_equals_reference(hidden):
    layer = _layer(MoEPP(k=2, router_hidden_mult=hidden))
    with torch.no_grad():  # a sharper router so every kind of expert gets picked
        (layer.router.gate if hidden is None else layer.router.gate[2]).weight.mul_(4.0)
    x = torch.randn(3, 11, D, dtype=torch.float64)
    a = layer.forward_with_aux(x).assignment
    counts = torch.bincount(a.expert_N, minlength=N + 4)
    assert (counts > 0).all(), f"every FFN and zero-computation expert must be exercised, got {counts.tolist()}"
    assert_matches_reference(layer, x, moepp_reference)


def test_moepp_gating_residual_equals_reference_and_chains():
    first = _layer(MoEPP(k=2))
    second = _layer(MoEPP(k=2, gating_residual=True))
    x = torch.randn(2, 5, D, dtype=torch.float64)
    out1 = first.forward_with_aux(x)
    prev = out1.assignment.logits_TE.detach()
    assert prev.shape == (10, N + 4)
    assert_matches_reference(
        second, x, lambda m, x: moepp_reference(m, x, prev), fast=lambda m, x: m(x, prev_logits=prev)
    )
    # the logits handed on are after this layer's residual: l_2 = own(x) + G(l_1)
    out2 = second.forward_with_aux(x, prev_logits=prev.reshape(2, 5, N + 4))
    own = torch.stack([_logits_ref(second.router, xt) for xt in x.reshape(-1, D)])
    assert (out2.assignment.logits_TE - (own + prev @ second.router.residual.weight.T)).abs().max() <= TOL64


def test_moepp_residual_errors():
    x = torch.randn(4, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs the previous MoE layer's logits"):
        _layer(MoEPP(gating_residual=True))(x)
    with pytest.raises(ValueError, match="gating_residual=False"):
        _layer(MoEPP())(x, prev_logits=torch.zeros(4, N + 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="prev_logits must have shape"):
        _layer(MoEPP(gating_residual=True))(x, prev_logits=torch.zeros(4, N + 3, dtype=torch.float64))


def test_moepp_without_zero_compute_selected_equals_vanilla_topk():
    """Invariant: when no zero-computation expert is selected, MoE++ is vanilla top-k with renormalised weights
    over the same FFN experts. The ZC experts are pushed out through the gating residual (G = I, prev logits -1e4
    on the ZC columns)."""
    moepp = _layer(MoEPP(k=2, router_hidden_mult=None, gating_residual=True))
    vanilla = MoE(D, N, router=TopK(k=2, normalize=True), experts=SwiGLU(hidden_dim=F_, impl="loop")).double().eval()
    with torch.no_grad():
        vanilla.router.gate.weight.copy_(moepp.router.gate.weight[:N])
        moepp.router.residual.weight.copy_(torch.eye(N + 4))
    vanilla.experts.load_state_dict(moepp.experts.state_dict())
    x = torch.randn(3, 9, D, dtype=torch.float64)
    prev = torch.zeros(27, N + 4, dtype=torch.float64)
    prev[:, N:] = -1e4
    out = moepp.forward_with_aux(x, prev_logits=prev)
    assert (out.assignment.expert_N < N).all()
    assert out.stats.experts_per_token == 2.0
    assert (out.y - vanilla(x)).abs().max() <= 1e-12


def test_zero_compute_pairs_never_reach_the_expert_bank():
    layer = _layer()
    seen = []
    layer.experts.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    out = layer.forward_with_aux(torch.randn(64, D, dtype=torch.float64))
    n_ffn = int((out.assignment.expert_N < N).sum())
    assert n_ffn < 2 * 64  # some tokens chose zero-computation experts
    assert seen == [n_ffn]
    assert out.stats.experts_per_token == n_ffn / 64  # mean FFN experts per token
    assert int(out.stats.tokens_per_expert_E.sum()) == n_ffn


def test_zero_expert_plus_ffn_gives_the_ffn_weight_one():
    layer = _layer(MoEPP(k=2, constant=0, copy=0, zero=1, router_hidden_mult=None))
    x = torch.randn(200, D, dtype=torch.float64)
    a = layer.forward_with_aux(x).assignment
    w = torch.zeros(200, N + 1, dtype=torch.float64).index_put_((a.token_N, a.expert_N), a.weight_N)
    with_zero = w[:, N] == 0
    picked_zero = torch.zeros(200, dtype=torch.bool)
    picked_zero[a.token_N[a.expert_N == N]] = True
    assert picked_zero.any()
    assert torch.allclose(w[picked_zero, :N].sum(-1), torch.ones(int(picked_zero.sum()), dtype=torch.float64))
    assert with_zero.all()


def test_hetero_balance_loss_equals_formula():
    tau = 0.3
    layer = _layer(balance=HeteroBalanceLoss(coef=0.01, tau=tau))
    x = torch.randn(40, D, dtype=torch.float64)
    out = layer.forward_with_aux(x)
    a = out.assignment
    T, E = 40, N + 4
    ref = 0.0
    for i in range(E):
        f_i = sum(1 for e in a.expert_N.tolist() if e == i) / T  # tokens that selected i, over T
        P_i = a.scores_TE[:, i].mean()
        ref = ref + (1.0 if i < N else tau) * f_i * P_i
    assert abs(out.losses["hetero_balance"].item() - 0.01 * ref.item()) <= 1e-15
    with pytest.raises(ValueError, match="tau"):
        HeteroBalanceLoss(tau=0.0)


def test_moepp_serializes():
    layer = _layer(MoEPP(k=2, constant=1, copy=2, zero=1, gating_residual=False), balance=HeteroBalanceLoss())
    clone = MoE.from_config(layer.config.to_dict()).double().eval()
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(6, D, dtype=torch.float64)
    assert torch.equal(clone(x), layer(x))


def test_moepp_bad_configs():
    with pytest.raises(ValueError, match="k=7 is larger"):
        _layer(MoEPP(k=7, constant=1, copy=1, zero=0))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        MoEPP(zero=-1)
