"""Task routers (M3ViT multi-gate and task-embedding gates, Edge-MoE task-level experts) against a per-token
reference written from the equations: outputs and every gradient, float64 <= 1e-10."""

import pytest
import torch
import torch.nn.functional as F

from moekit import MLP, MoE
from moekit.routers import MultiGate, PathwayGate, TaskEmbedGate, TaskExperts
from moekit.spec import spec_from_dict

TOL = 1e-10
D, E = 6, 6


def _layer(spec, softmax="exact"):
    import dataclasses

    spec = dataclasses.replace(spec, softmax=softmax)
    layer = MoE(D, E, router=spec, experts=MLP(hidden_dim=5)).double()
    with torch.no_grad():
        for b in (layer.experts.b1_EF, layer.experts.b2_ED):
            b.normal_()
    return layer


def _gate_logits(layer, x_D, t):
    """Per-token gate logits over the experts task t may use, and their ids (from the equations)."""
    r = layer.router
    if isinstance(layer.router.spec, MultiGate):
        W = r.weight_NED[t]
        return torch.stack([W[e] @ x_D for e in range(E)]), list(range(E))
    if isinstance(layer.router.spec, TaskEmbedGate):
        onehot = torch.zeros(layer.router.spec.num_tasks, dtype=x_D.dtype)
        onehot[t] = 1
        h = F.gelu(r.embed_in.weight @ onehot + r.embed_in.bias)
        h = r.embed_out.weight @ h + r.embed_out.bias
        mu, var = h.mean(), h.var(unbiased=False)
        tau = (h - mu) / torch.sqrt(var + r.embed_norm.eps) * r.embed_norm.weight + r.embed_norm.bias
        z = torch.cat([x_D, tau])
        return torch.stack([r.gate.weight[e] @ z for e in range(E)]), list(range(E))
    ids = list(r.expert_sets[t])
    W = r.gates[t]
    return torch.stack([W[i] @ x_D for i in range(len(ids))]), ids


def _reference(layer, x_TD, task_T):
    k, normalize = layer.router.spec.k, layer.router.spec.normalize
    out = []
    for x_D, t in zip(x_TD, task_T):
        logits, ids = _gate_logits(layer, x_D, int(t))
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        top = sorted(range(len(ids)), key=lambda i: -float(p[i].detach()))[:k]
        w = [p[i] for i in top]
        if normalize:
            s = sum(w)
            w = [wi / s for wi in w]
        out.append(sum(wi * layer.experts.expert_forward(ids[i], x_D[None])[0] for wi, i in zip(w, top)))
    return torch.stack(out)


SPECS = [
    MultiGate(num_tasks=3, k=2),
    MultiGate(num_tasks=3, k=3, normalize=True),
    TaskEmbedGate(num_tasks=3, k=2, task_dim=4),
    TaskExperts(num_tasks=3, k=2, experts_per_task=3),
    TaskExperts(num_tasks=2, k=1, expert_sets=((0, 5), (1, 2, 3))),
]


def _grads(layer, x, fn):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    g = {"x": x.grad.clone()}
    g.update({n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in layer.named_parameters()})
    return y.detach(), g


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.type_name}-k{s.k}")
@pytest.mark.parametrize("per_token", [False, True])
def test_task_router_matches_reference(spec, per_token):
    layer = _layer(spec)
    x = torch.randn(10, D, dtype=torch.float64)
    n = spec.num_tasks
    if per_token:
        task = torch.arange(10) % n
        fast = lambda x: layer(x, task=task)
    else:
        task = torch.full((10,), n - 1)
        fast = lambda x: layer(x, task=n - 1)
    y1, g1 = _grads(layer, x, fast)
    y2, g2 = _grads(layer, x, lambda x: _reference(layer, x, task))
    assert (y1 - y2).abs().max() <= TOL
    for name in g1:
        assert (g1[name] - g2[name]).abs().max() <= TOL, name


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.type_name)
def test_online_gate_softmax_within_1e6(spec):
    exact = _layer(spec).float()
    online = _layer(spec, softmax="online").float()
    online.load_state_dict(exact.state_dict())
    x = torch.randn(64, D) * 4
    a, b = exact.router(x, task=1), online.router(x, task=1)
    assert torch.equal(a.expert_N, b.expert_N)
    assert (a.weight_N - b.weight_N).abs().max() <= 1e-6


def test_task_experts_only_uses_own_experts():
    layer = _layer(TaskExperts(num_tasks=3, k=2, experts_per_task=2))
    x = torch.randn(200, D, dtype=torch.float64)
    for t, owned in enumerate(layer.router.expert_sets):
        assert set(layer.router(x, task=t).expert_N.tolist()) <= set(owned)
    assert layer.router.expert_sets == ((0, 1), (2, 3), (4, 5))


def test_task_experts_windows_overlap_when_larger():
    assert TaskExperts(num_tasks=3, experts_per_task=6).sets(12) == (tuple(range(0, 6)), tuple(range(3, 9)),
                                                                    tuple(range(6, 12)))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.type_name)
def test_unknown_task_ids_raise(spec):
    layer = _layer(spec)
    x = torch.randn(4, D, dtype=torch.float64)
    for bad, match in ((spec.num_tasks, "unknown task id"), (-1, "unknown task id"), (None, "task-conditioned"),
                       ("left", "task name"), (torch.tensor([0, 1, 9, 0]), "unknown task id 9"),
                       (torch.zeros(3, dtype=torch.long), "one id per token"), (1.0, "integer"),
                       (torch.tensor(0.5), "integers")):
        with pytest.raises(ValueError, match=match):
            layer(x, task=bad)


def test_spec_validation_and_roundtrip():
    with pytest.raises(ValueError, match="k=3"):
        MoE(D, 4, router=TaskExperts(num_tasks=2, k=3))
    with pytest.raises(ValueError, match="outside"):
        MoE(D, 4, router=TaskExperts(num_tasks=1, expert_sets=((0, 7),), k=1))
    with pytest.raises(ValueError, match="expert_sets has"):
        TaskExperts(num_tasks=2, expert_sets=((0, 1),))
    with pytest.raises(ValueError, match="softmax"):
        MultiGate(num_tasks=2, softmax="fast")
    with pytest.raises(ValueError, match="num_tasks"):
        MultiGate(num_tasks=0)
    for spec in SPECS + [PathwayGate(num_scores=6, k=2)]:
        layer = MoE(D, E, router=spec, experts=MLP(hidden_dim=4))
        again = MoE.from_config(layer.config.to_dict())
        assert again.config == layer.config
        assert spec_from_dict("router", spec.to_dict()) == spec


def test_pathway_gate_never_selects_dropped_columns_but_keeps_their_mass():
    layer = MoE(D, 2, router=PathwayGate(num_scores=4, k=1), experts=MLP(hidden_dim=4)).double()
    r = layer.router
    with torch.no_grad():
        r.weight_SD.normal_()
        r.expert_S.copy_(torch.tensor([-1, 0, -1, 1]))
    x = torch.randn(50, D, dtype=torch.float64)
    a = r(x)
    logits = x @ r.weight_SD.T
    p = torch.softmax(logits, -1)
    best = torch.where(logits[:, 1] >= logits[:, 3], 1, 3)
    assert torch.equal(a.expert_N, r.expert_S[best])
    assert (a.weight_N - p.gather(1, best[:, None])[:, 0]).abs().max() <= 1e-15
