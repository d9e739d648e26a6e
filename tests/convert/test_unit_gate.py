"""UnitGate passes the wrapped router's declarations through: it changes the combine weights and nothing else, so
UnitGate(MoE++) keeps its compute-free experts and gating residual, UnitGate(Hash) its token ids, UnitGate(AoE) its
expert binding, UnitGate(TopK) + AuxFree its selection bias, for every registered router."""

import dataclasses

import pytest
import torch

from moekit import AuxFree, MoE, SwiGLU, TopK
from moekit.convert.unit_gate import UnitGate
from moekit.experts import AoEExperts
from moekit.routers import AoE, MoEPP
from moekit.spec import spec_from_dict

from _router_battery import ARGS, D, E, EXPERTS
from _router_battery import ROUTERS as _ALL
from _router_battery import call_kw

T = 12
ROUTERS = [n for n in _ALL if n != "unit_gate"]
DECLARATIONS = ("task_conditioned", "needs_token_ids", "needs_prev_logits", "reads_experts", "has_selection_bias",
                "num_free_experts", "supports_replay", "consistency_passes")


@pytest.mark.parametrize("name", ROUTERS)
def test_unit_gate_keeps_every_declaration_and_the_pairs(name):
    inner = spec_from_dict("router", {"type": name, **ARGS.get(name, {})})
    spec = UnitGate(router=inner)
    for d in DECLARATIONS:
        assert getattr(spec, d) == getattr(inner, d), d
    experts = EXPERTS.get(name, SwiGLU(hidden_dim=12))
    assert spec.flops_per_token(D, E, experts=experts) == inner.flops_per_token(D, E, experts=experts)
    assert spec.at_layer(0) == UnitGate(router=inner.at_layer(0))
    assert spec.for_step_budget(10) == UnitGate(router=inner.for_step_budget(10))
    assert spec.with_selection_bias() == UnitGate(router=inner.with_selection_bias())

    torch.manual_seed(0)
    plain = MoE(D, E, router=inner, experts=experts).double().eval()
    torch.manual_seed(0)
    gated = MoE(D, E, router=spec, experts=experts).double().eval()
    assert (gated.free_experts is None) == (plain.free_experts is None)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    kw = call_kw(plain, T, 1)
    torch.manual_seed(2)  # routers that sample (THOR) draw the same experts
    a = plain.forward_with_aux(x, **kw)
    torch.manual_seed(2)
    b = gated.forward_with_aux(x, **kw)
    b.assignment.check()
    assert torch.equal(a.assignment.token_N, b.assignment.token_N)
    assert torch.equal(a.assignment.expert_N, b.assignment.expert_N)
    assert b.assignment.num_free_experts == a.assignment.num_free_experts
    assert torch.equal(b.assignment.weight_N.detach(), torch.ones_like(b.assignment.weight_N))
    b.y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert MoE.from_config(gated.config.to_dict()).config.router == spec


def test_unit_gate_moepp_keeps_free_experts_and_gating_residual():
    """Zero / copy / constant experts with unit weight: a token sent to the copy expert gets x added, to the zero
    expert nothing; the previous layer's logits are accepted."""
    torch.manual_seed(0)
    moepp = MoEPP(k=2, router_hidden_mult=None, gating_residual=True)
    layer = MoE(D, E, router=UnitGate(router=moepp), experts=SwiGLU(hidden_dim=6))
    assert layer.needs_prev_logits and layer.free_experts is not None
    x = torch.randn(T, D)
    out = layer.forward_with_aux(x, prev_logits=torch.randn(T, E + layer.router_spec.num_free_experts))
    a = out.assignment
    assert a.num_free_experts == layer.router_spec.num_free_experts > 0
    # the output is the unit-weight sum of every chosen expert, compute-free ones included
    bank, free = a.split_free()
    ref = layer.free_experts(x, free)
    for t, e in zip(bank.token_N.tolist(), bank.expert_N.tolist()):
        ref[t] += layer.experts.expert_forward(e, x[t:t + 1])[0]
    assert (out.y - ref).abs().max() <= 1e-5


def test_unit_gate_with_aux_free_moves_the_wrapped_bias():
    torch.manual_seed(0)
    layer = MoE(D, E, router=UnitGate(router=TopK(k=1)), balance=AuxFree(rate=0.1)).train()
    assert layer.router_spec.has_selection_bias and layer.router.bias_E is layer.router.inner.bias_E
    layer(torch.randn(T, D))
    layer.update_bias()
    assert layer.router.bias_E.abs().sum() > 0


def test_unit_gate_aoe_binds_the_experts():
    torch.manual_seed(0)
    layer = MoE(D, E, router=UnitGate(router=AoE()), experts=AoEExperts(hidden_dim=12, rank=4))
    assert layer.reads_experts
    y = layer(torch.randn(T, D))
    assert torch.isfinite(y).all()


def test_unit_gate_rewraps_only_when_the_inner_spec_changes():
    spec = UnitGate(router=TopK(k=2))
    assert spec.for_step_budget(5) is spec and dataclasses.replace(spec) == spec
