"""What a test needs to build and call any registered router (shared by tests/routers/test_spec_battery.py and
tests/convert/test_unit_gate.py): the spec arguments of routers whose default spec needs some, their special
experts, the registered names, and the call arguments a layer's declarations ask for."""

from __future__ import annotations

import torch

from moekit import MoE
from moekit.experts import AoEExperts
from moekit.spec import SPECS

D, E = 8, 4
ARGS = {  # routers whose default spec needs arguments (or special experts)
    "multi_gate": {"num_tasks": 2}, "task_embed": {"num_tasks": 2}, "task_experts": {"num_tasks": 2},
    "pathway": {"num_scores": E}, "unit_gate": {"router": {"type": "topk", "k": 2}}, "hash": {"vocab_size": 50},
}
EXPERTS = {"aoe": AoEExperts(hidden_dim=12, rank=4)}
ROUTERS = sorted(n.split(":", 1)[1] for n in SPECS.names() if n.startswith("router:"))


def call_kw(layer: MoE, T: int, seed: int) -> dict:
    """Task ids, token ids and previous-layer logits for ``T`` tokens, as far as ``layer`` declares it reads them."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if layer.task_conditioned:
        kw["task"] = torch.randint(2, (T,), generator=g)
    if layer.needs_token_ids:
        kw["token_ids"] = torch.randint(50, (T,), generator=g)
    if layer.needs_prev_logits:
        E_all = E + layer.router_spec.num_free_experts
        kw["prev_logits"] = torch.randn(T, E_all, generator=g, dtype=torch.float64)
    return kw
