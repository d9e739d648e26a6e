"""Router replay: record the routing decisions of a forward pass (per layer, per call, per token) and replay them in
a later pass, so that training on rollouts sees the experts that generated them (Megatron's R3 for RL).

    with record_routing(model) as record:     # record: {layer name: [(T, K) expert ids per call]}
        model(x)
    with replay_routing(model, record):       # same layers, same calls, same token counts
        loss = model(x).sum()                 # selection is the recorded one; weights still get gradients

The record is plain tensors (``torch.save`` it to replay in another process). The replayed pass recomputes the router
scores and combine weights from the current parameters; only *which* experts each token uses is fixed. Routers whose
spec declares ``supports_replay`` (top-k token choice: Switch, Mixtral, Qwen-MoE, DeepSeek-V3) can be replayed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import Tensor, nn

from .walk import moe_layers


def _replayable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = list(moe_layers(model))
    for name, m in layers:
        if m.router_spec is None or not m.router_spec.supports_replay:
            raise ValueError(f"router replay: layer {name!r} uses {type(m.router).__name__}, which cannot replay "
                             "recorded choices (top-k routers can)")
    return layers


@contextmanager
def record_routing(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Record every MoE layer's (T, K) expert choices of each call inside the block."""
    layers = _replayable(model)
    record: dict[str, list[Tensor]] = {}
    for name, m in layers:
        m.routing_log = record.setdefault(name, [])
    try:
        yield record
    finally:
        for _, m in layers:
            m.routing_log = None


@contextmanager
def replay_routing(model: nn.Module, record: dict[str, list[Tensor]]) -> Iterator[None]:
    """Inside the block every MoE layer selects the experts recorded by :func:`record_routing`, call by call."""
    layers = _replayable(model)
    missing = [name for name, _ in layers if name not in record]
    if missing:
        raise ValueError(f"router replay: no recorded choices for layers {missing}")
    for name, m in layers:
        m.replay_queue = list(record[name])
    try:
        yield
    finally:
        for _, m in layers:
            m.replay_queue = None
