"""A battery over every registered router spec: finite forward and backward, every parameter reached by a gradient
once routing has touched every expert, config round trip, and a valid Assignment. A newly registered router is
picked up automatically: it runs with its default spec, or with the arguments listed in ``ARGS`` below."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, SwiGLU
from moekit.routers.base import RouterSpec
from moekit.spec import spec_from_dict

from _router_battery import ARGS, D, E, EXPERTS, ROUTERS
from _router_battery import call_kw as _call_kw

T = 24


def _layer(name: str) -> MoE:
    spec = spec_from_dict("router", {"type": name, **ARGS.get(name, {})})
    return MoE(D, E, router=spec, experts=EXPERTS.get(name, SwiGLU(hidden_dim=12))).double()


def test_every_router_is_covered():
    assert len(ROUTERS) >= 14 and "topk" in ROUTERS


@pytest.mark.parametrize("name", ROUTERS)
def test_router_battery(name):
    torch.manual_seed(0)
    layer = _layer(name).train()
    assert isinstance(layer.router_spec, RouterSpec)
    seen = {n: False for n, p in layer.named_parameters() if p.requires_grad}
    for call in range(12):  # stochastic routers (THOR) need several calls to reach every expert
        x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
        out = layer.forward_with_aux(x, **_call_kw(layer, T, call))
        out.assignment.check()
        assert torch.isfinite(out.y).all()
        assert out.assignment.counts_E().sum() == out.assignment.num_pairs
        loss = out.y.square().sum() + out.aux_loss
        loss.backward()
        assert torch.isfinite(x.grad).all()
        for n, p in layer.named_parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                seen[n] = True
        if all(seen.values()):
            break
    assert all(seen.values()), [n for n, ok in seen.items() if not ok]

    # config round trip: same spec, same weights, same output
    layer.eval()
    clone = MoE.from_config(layer.config.to_dict()).double().eval()
    clone.load_state_dict(layer.state_dict())
    assert clone.config == layer.config
    x = torch.randn(T, D, dtype=torch.float64)
    kw = _call_kw(layer, T, 99)
    if name == "thor":  # random experts at inference: same seed for both
        torch.manual_seed(5)
        y0 = layer(x, **kw)
        torch.manual_seed(5)
        assert torch.equal(clone(x, **kw), y0)
    else:
        assert torch.equal(clone(x, **kw), layer(x, **kw))


@pytest.mark.parametrize("name", ROUTERS)
def test_router_declarations_are_consistent(name):
    layer = _layer(name)
    spec = layer.router_spec
    assert (layer.free_experts is not None) == (spec.num_free_experts > 0)
    a = layer.forward_with_aux(torch.randn(3, D, dtype=torch.float64), **_call_kw(layer, 3, 0)).assignment
    assert a.num_experts == E + spec.num_free_experts and a.num_free_experts == spec.num_free_experts
    assert spec.flops_per_token(D, E, experts=layer.config.experts, task=0) >= 0
    if not spec.task_conditioned:
        with pytest.raises(ValueError, match="not task-conditioned"):
            layer(torch.randn(3, D, dtype=torch.float64), task=0, **{k: v[:3] for k, v in _call_kw(layer, 3, 0).items()})
