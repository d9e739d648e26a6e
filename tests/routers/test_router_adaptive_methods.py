"""AdaMoE null experts, Autonomy-of-Experts, HMoE expert sizes, hash routing, THOR and SMoE-Dropout against
per-token references written from the equations.

Tolerance: float64, absolute 1e-10 (outputs and every gradient) unless a test says otherwise.
"""

import pytest
import torch
import torch.nn.functional as F
from _routing_methods_ref import TOL64, assert_matches_reference, swiglu_expert

from moekit import MoE, SwiGLU, SwitchLoss, TopK
from moekit.experts import AoEExperts, HeteroFFN, SizePenalty
from moekit.routers import (
    THOR,
    AdaMoE,
    AoE,
    Hash,
    SMoEDropout,
    advance_smoe_dropout,
    set_inference_k,
    thor_consistency_loss,
)

D, F_ = 8, 6
f64 = torch.float64


def _swiglu_layer(router, E=4, **kw):
    return MoE(D, E, router=router, experts=SwiGLU(hidden_dim=F_, impl="loop"), **kw).double().eval()


def _desc(p, n=None):
    return sorted(range(len(p)), key=lambda e: -float(p[e].detach()))[:n]


# ------------------------------------------------------------------------------------------------------ AdaMoE
def adamoe_reference(layer, x):
    """softmax over [W x ; W_null x], top-k; the true experts among the k share weight 1 in proportion to p."""
    r = layer.router
    N = r.num_true
    rows = []
    for x_D in x.reshape(-1, D):
        p = torch.softmax(torch.cat([r.gate.weight @ x_D, r.null_gate.weight @ x_D]), 0)
        true = [e for e in _desc(p, r.spec.k) if e < N]
        total = sum(p[e] for e in true) if true else 0.0
        y = x_D.new_zeros(D)
        for e in true:
            y = y + p[e] / (total + 1e-20) * swiglu_expert(layer.experts, e, x_D)
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


def test_adamoe_equals_reference_and_adapts_expert_count():
    layer = _swiglu_layer(AdaMoE(k=3, num_null=4), E=4)
    with torch.no_grad():
        layer.router.gate.weight.mul_(3.0)
        layer.router.null_gate.weight.mul_(3.0)
    x = torch.randn(3, 10, D, dtype=f64)
    assert_matches_reference(layer, x, adamoe_reference)
    out = layer.forward_with_aux(x)
    ffn_per_token = torch.bincount(out.assignment.token_N[out.assignment.expert_N < 4], minlength=30)
    assert ffn_per_token.min() < ffn_per_token.max()  # adaptive: tokens use different numbers of true experts
    assert out.stats.experts_per_token == ffn_per_token.double().mean().item() < 3


def test_adamoe_balance_loss_runs_over_true_and_null_experts():
    layer = _swiglu_layer(AdaMoE(k=2, num_null=2), E=4, balance=SwitchLoss(coef=1.0))
    out = layer.forward_with_aux(torch.randn(50, D, dtype=f64))
    a = out.assignment
    f = torch.bincount(a.expert_N, minlength=6).double() / a.num_pairs
    ref = 6 * (f * a.scores_TE.mean(0)).sum()
    assert a.scores_TE.shape == (50, 6)
    assert abs(out.losses["switch"].item() - ref.item()) <= 1e-14


def test_adamoe_bad_configs():
    with pytest.raises(ValueError, match="too many null experts"):
        _swiglu_layer(AdaMoE(k=2, num_null=5), E=4)  # at most (k - 1) * N = 4
    with pytest.raises(ValueError, match="num_null must be >= 1"):
        AdaMoE(k=2, num_null=0)
    with pytest.raises(ValueError, match="exceeds"):
        _swiglu_layer(AdaMoE(k=9, num_null=4), E=4)


# ---------------------------------------------------------------------------------------- Autonomy-of-Experts
def aoe_reference(layer, x):
    """logit_e = ||W_down^e x||, p = softmax, top-k; y = sum p_e W2^e (silu(W_up^e a_e) * W3^e x)."""
    b = layer.experts
    rows = []
    for x_D in x.reshape(-1, D):
        a = [b.w_down_ERD[e] @ x_D for e in range(b.num_experts)]
        p = torch.softmax(torch.stack([torch.sqrt((a_e * a_e).sum()) for a_e in a]), 0)
        y = x_D.new_zeros(D)
        for e in _desc(p, layer.router.spec.k):
            h = F.silu(b.w_up_EFR[e] @ a[e]) * (b.w3_EFD[e] @ x_D)
            y = y + p[e] * (b.w2_EDF[e] @ h)
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


def test_aoe_equals_reference():
    layer = MoE(D, 5, router=AoE(k=2), experts=AoEExperts(hidden_dim=F_, rank=3, impl="loop")).double().eval()
    assert_matches_reference(layer, torch.randn(2, 7, D, dtype=f64), aoe_reference)
    # router-free: the only parameters are the experts'; none are registered twice
    assert {n.split(".")[0] for n, _ in layer.named_parameters()} == {"experts"}
    assert not any(k.startswith("router.") for k in layer.state_dict())


def test_aoe_needs_aoe_experts():
    with pytest.raises(ValueError, match="AoEExperts"):
        MoE(D, 4, router=AoE(k=2), experts=SwiGLU(hidden_dim=F_))


# --------------------------------------------------------------------------------------------- HMoE sizes
def test_hetero_sizes_equal_reference():
    dims = (2, 5, 9, 4)
    layer = MoE(D, 4, router=TopK(k=2), experts=HeteroFFN(hidden_dims=dims)).double().eval()
    bank = layer.experts

    def reference(m, x):
        rows = []
        starts = [sum(dims[:e]) for e in range(4)]
        for x_D in x.reshape(-1, D):
            p = torch.softmax(m.router.gate.weight @ x_D, 0)
            top = _desc(p, 2)
            total = p[top[0]] + p[top[1]]
            y = x_D.new_zeros(D)
            for e in top:
                s = slice(starts[e], starts[e] + dims[e])
                h = F.silu(bank.w1_SD[s] @ x_D) * (bank.w3_SD[s] @ x_D)
                y = y + p[e] / total * (bank.w2_DS[:, s] @ h)
            rows.append(y)
        return torch.stack(rows).reshape(x.shape)

    assert_matches_reference(layer, torch.randn(3, 6, D, dtype=f64), reference)
    assert bank.expert_forward(2, torch.ones(1, D, dtype=f64)).shape == (1, D)


def test_size_penalty_equals_formula_and_is_switch_for_equal_sizes():
    dims = (2, 4, 6, 12)
    layer = MoE(D, 4, router=TopK(k=2), experts=HeteroFFN(hidden_dims=dims),
                balance=(SwitchLoss(coef=1.0), SizePenalty(coef=1.0, hidden_dims=dims))).double()
    out = layer.forward_with_aux(torch.randn(30, D, dtype=f64))
    a = out.assignment
    f = torch.bincount(a.expert_N, minlength=4).double() / a.num_pairs
    size = torch.tensor(dims, dtype=f64) / 6.0
    ref = 4 * (f * size * a.scores_TE.mean(0)).sum()
    assert abs(out.losses["size_penalty"].item() - ref.item()) <= 1e-14
    even = SizePenalty(coef=1.0, hidden_dims=(5, 5, 5, 5)).loss(a)
    assert abs(even.item() - out.losses["switch"].item()) <= 1e-14
    # the penalty is larger when the big expert gets the traffic
    assert SizePenalty(hidden_dims=dims).loss(a) != SizePenalty(hidden_dims=dims[::-1]).loss(a)


def test_hetero_bad_configs():
    with pytest.raises(ValueError, match="one per expert"):
        MoE(D, 3, experts=HeteroFFN(hidden_dims=(4, 8)))
    with pytest.raises(ValueError, match="positive sizes"):
        HeteroFFN(hidden_dims=(4, 0))
    layer = MoE(D, 4, experts=HeteroFFN(hidden_dims=(4, 4, 4, 4)), balance=SizePenalty(hidden_dims=(4, 4)))
    with pytest.raises(ValueError, match="2 hidden_dims for 4"):
        layer(torch.randn(3, D))


def test_hetero_serializes():
    layer = MoE(D, 3, experts=HeteroFFN(hidden_dims=(3, 4, 5)), balance=SizePenalty(hidden_dims=(3, 4, 5)))
    clone = MoE.from_config(layer.config.to_dict())
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(5, D)
    assert torch.equal(clone(x), layer(x))


# ------------------------------------------------------------------------------------------------------- hash
def test_hash_table_is_balanced_and_output_is_the_hashed_expert():
    layer = _swiglu_layer(Hash(vocab_size=40, seed=3), E=4)
    table = layer.router.table_V
    assert torch.bincount(table, minlength=4).tolist() == [10, 10, 10, 10]
    ids = torch.randint(40, (2, 6))
    x = torch.randn(2, 6, D, dtype=f64)

    def reference(m, x):
        rows = [swiglu_expert(m.experts, int(table[i]), x_D) for x_D, i in zip(x.reshape(-1, D), ids.reshape(-1))]
        return torch.stack(rows).reshape(x.shape)

    assert_matches_reference(layer, x, reference, fast=lambda m, x: m(x, task=ids))
    # same id, same expert, whatever the hidden state
    a = layer.forward_with_aux(torch.randn(3, D, dtype=f64), task=torch.tensor([7, 7, 7])).assignment
    assert a.expert_N.tolist() == [int(table[7])] * 3


def test_hash_without_vocabulary_is_a_fixed_function_of_the_id():
    r = _swiglu_layer(Hash(), E=4).router
    ids = torch.arange(1000)
    e = r.expert_of(ids)
    knuth = [((i * 2654435761) % 2**32) % 4 for i in range(1000)]  # the documented hash, in Python ints
    assert e.tolist() == knuth and e.min() >= 0 and e.max() < 4
    assert torch.bincount(e, minlength=4).min() > 200  # spreads ids over every expert


def test_hash_errors():
    layer = _swiglu_layer(Hash(vocab_size=10), E=4)
    x = torch.randn(3, D, dtype=f64)
    with pytest.raises(ValueError, match="needs the token ids"):
        layer(x)
    with pytest.raises(ValueError, match="one id per token"):
        layer(x, task=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        layer(x, task=torch.tensor([1, 2, 10]))


# ------------------------------------------------------------------------------------------------------- THOR
def _which_expert(layer, x_D, y_D):
    errs = [(swiglu_expert(layer.experts, e, x_D) - y_D).abs().max().item() for e in range(layer.num_experts)]
    e = min(range(len(errs)), key=errs.__getitem__)
    assert errs[e] <= TOL64
    return e


def test_thor_training_sends_the_whole_batch_to_one_random_expert():
    layer = _swiglu_layer(THOR(), E=4).train()
    x = torch.randn(12, D, dtype=f64)
    chosen = set()
    for _ in range(12):
        y = layer(x)
        experts = {_which_expert(layer, x[t], y[t]) for t in range(12)}
        assert len(experts) == 1  # weight 1, one expert for every token
        chosen |= experts
    assert len(chosen) > 1  # two passes draw independently


def test_thor_inference_draws_per_token():
    layer = _swiglu_layer(THOR(eval_mode="token"), E=4).eval()
    x = torch.randn(40, D, dtype=f64)
    y = layer(x)
    assert len({_which_expert(layer, x[t], y[t]) for t in range(40)}) > 1
    batch = _swiglu_layer(THOR(eval_mode="batch"), E=4).eval()
    yb = batch(x)
    assert len({_which_expert(batch, x[t], yb[t]) for t in range(40)}) == 1
    with pytest.raises(ValueError, match="eval_mode"):
        THOR(eval_mode="sentence")


def test_thor_consistency_loss_equals_symmetric_kl():
    a = torch.randn(3, 5, 7, dtype=f64, requires_grad=True)
    b = torch.randn(3, 5, 7, dtype=f64)
    mask = torch.rand(3, 5) > 0.3
    loss = thor_consistency_loss(a, b, alpha=5.0, mask=mask)
    loss.backward()
    g = a.grad.clone()
    a.grad = None
    terms = []
    for i in range(3):
        for j in range(5):
            if mask[i, j]:
                p, q = torch.softmax(a[i, j], 0), torch.softmax(b[i, j], 0)
                kl_pq = (p * (p.log() - q.log())).sum()
                kl_qp = (q * (q.log() - p.log())).sum()
                terms.append(0.5 * (kl_pq + kl_qp))
    ref = 5.0 * torch.stack(terms).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-12
    assert (g - a.grad).abs().max() <= 1e-12
    assert thor_consistency_loss(b, b).item() == 0.0


def test_thor_consistency_loss_sum_reduction():
    a, b = torch.randn(4, 6, dtype=f64), torch.randn(4, 6, dtype=f64)
    per = [thor_consistency_loss(a[i : i + 1], b[i : i + 1]).item() for i in range(4)]
    assert abs(thor_consistency_loss(a, b, reduction="sum").item() - sum(per)) <= 1e-12
    with pytest.raises(ValueError, match="reduction"):
        thor_consistency_loss(a, b, reduction="none")


# ---------------------------------------------------------------------------------------------- SMoE-Dropout
def smoe_reference(layer, x):
    """top-k by the frozen logits x W + b, weights softmax over the k selected logits."""
    r = layer.router
    k = r.current_k
    rows = []
    for x_D in x.reshape(-1, D):
        logits = r.weight_ED @ x_D + r.bias_E_frozen
        top = _desc(logits, k)
        w = torch.softmax(torch.stack([logits[e] for e in top]), 0)
        rows.append(sum(w[j] * swiglu_expert(layer.experts, e, x_D) for j, e in enumerate(top)))
    return torch.stack(rows).reshape(x.shape)


def test_smoe_dropout_router_is_frozen_and_equals_reference():
    layer = _swiglu_layer(SMoEDropout(k_min=1, k_max=4, total_steps=6), E=4)
    assert list(layer.router.parameters()) == []  # frozen: buffers only
    for k in (1, 3):
        set_inference_k(layer, k)
        assert_matches_reference(layer, torch.randn(2, 5, D, dtype=f64), smoe_reference)


def test_smoe_dropout_k_schedule_and_any_k_at_inference():
    layer = _swiglu_layer(SMoEDropout(k_min=1, k_max=4, total_steps=6), E=4).train()
    x = torch.randn(10, D, dtype=f64)
    seen = []
    for _ in range(8):
        seen.append(layer.forward_with_aux(x).stats.experts_per_token)
        advance_smoe_dropout(layer)
    # k(s) = 1 + floor(3 s / 6) for s = 0..7, capped at k_max from s = 6
    assert seen == [1, 1, 2, 2, 3, 3, 4, 4]
    layer.eval()
    assert layer.forward_with_aux(x).stats.experts_per_token == 4  # default inference k = k_max
    for k in (1, 2, 3, 4):
        set_inference_k(layer, k)
        assert layer.forward_with_aux(x).stats.experts_per_token == k
    with pytest.raises(ValueError, match="inference k"):
        set_inference_k(layer, 5)
    state = layer.state_dict()
    assert int(state["router.step"]) == 8  # the schedule position is saved with the model


def test_smoe_dropout_bad_configs():
    with pytest.raises(ValueError, match="k_max=1 is smaller"):
        SMoEDropout(k_min=2, k_max=1)
    with pytest.raises(ValueError, match="<= the number of experts"):
        _swiglu_layer(SMoEDropout(k_min=1, k_max=8), E=4)
    with pytest.raises(ValueError, match="total_steps"):
        SMoEDropout(total_steps=0)


# -------------------------------------------------------------------------------------- registry / serialization
@pytest.mark.parametrize("router,experts", [
    ({"type": "expert_choice", "capacity_factor": 1.5}, None), ({"type": "top_p", "threshold": 0.3}, None),
    ("moepp", None), ({"type": "adamoe", "k": 2, "num_null": 2}, None), ("aoe", {"type": "aoe", "rank": 4}),
    ({"type": "hash", "vocab_size": 50}, None), ({"type": "smoe_dropout", "k_min": 1, "k_max": 3}, None),
], ids=["expert_choice", "top_p", "moepp", "adamoe", "aoe", "hash", "smoe_dropout"])
def test_router_built_by_name_round_trips_through_config(router, experts):
    layer = MoE(D, 4, router=router, experts=experts or SwiGLU(hidden_dim=F_)).eval()
    clone = MoE.from_config(layer.config.to_dict()).eval()
    clone.load_state_dict(layer.state_dict())
    x, ids = torch.randn(2, 5, D), torch.randint(50, (2, 5))
    kw = {"token_ids": ids} if layer.needs_token_ids else {}
    assert torch.equal(clone(x, **kw), layer(x, **kw))
