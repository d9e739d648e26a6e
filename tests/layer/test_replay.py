"""Router replay: a replayed pass selects the recorded experts; with unchanged parameters it reproduces the recorded
pass exactly (outputs and gradients), and with changed router weights it still uses the recorded experts."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, SwiGLU, THOR, TopK
from moekit.replay import record_routing, replay_routing

D = 8


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(MoE(D, 4, router=TopK(k=2, noise_std=1.0), experts=SwiGLU(hidden_dim=12)),
                               MoE(D, 4, router=TopK(k=1), experts=SwiGLU(hidden_dim=12))).double().train()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_replay_reproduces_the_recorded_pass():
    model = _model()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    torch.manual_seed(1)
    with record_routing(model) as record:
        y_rec = model(x)
    y_rec.square().sum().backward()
    g_rec = _grads(model)
    assert [r[0].shape for r in record.values()] == [(10, 2), (10, 1)]
    model.zero_grad()
    torch.manual_seed(1)  # same router noise: identical logits, weights and outputs
    with replay_routing(model, record):
        y_rep = model(x)
    y_rep.square().sum().backward()
    assert torch.equal(y_rep, y_rec)
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), g_rec))


def test_replay_fixes_the_selection_when_the_router_changes():
    model = _model()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with record_routing(model) as record:
        model(x)
    with torch.no_grad():
        for m in model:
            m.router.gate.weight.add_(torch.randn_like(m.router.gate.weight))
    free = model[0].forward_with_aux(x).assignment  # fresh noise and new weights: other choices
    with replay_routing(model, record):
        replayed = model[0].forward_with_aux(x).assignment
    assert torch.equal(replayed.expert_N.view(2, -1).t(), record["0"][0])
    assert not torch.equal(free.expert_N, replayed.expert_N)
    assert replayed.weight_N.requires_grad


def test_replay_errors():
    model = _model()
    x = torch.randn(3, D, dtype=torch.float64)
    with record_routing(model) as record:
        model(x)
    with replay_routing(model, record), pytest.raises(ValueError, match="ran out of recorded calls"):
        model(x)
        model(x)
    with replay_routing(model, record), pytest.raises(ValueError, match=r"recorded choices have shape \(3, 2\)"):
        model(torch.randn(4, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot replay"):
        with record_routing(MoE(D, 2, router=THOR())):
            pass
