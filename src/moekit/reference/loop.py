"""Slow, obviously correct MoE: one token at a time, written from the equations. Used by tests only.

It reads the parameters of a built :class:`moekit.MoE` (so gradients flow to the same tensors) but none of its
routing or dispatch code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..dispatch.local import CapacityDispatcher


def _route_token(layer, x_D: Tensor) -> tuple[list[int], list[Tensor]]:
    r = layer.router
    s = r.spec
    W, b = r.gate.weight, r.gate.bias
    E = layer.num_experts
    if s.logits_dtype is not None:  # the router's own precision policy (Hugging Face parity)
        dt = getattr(torch, s.logits_dtype)
        x_D, W, b = x_D.to(dt), W.to(dt), None if b is None else b.to(dt)
    logits = [W[e] @ x_D + (b[e] if b is not None else 0) for e in range(E)]
    logits = torch.stack(logits)
    if s.score_dtype is not None:
        logits = logits.to(getattr(torch, s.score_dtype))
    if s.score == "softmax":
        m = logits.max()
        ex = torch.exp(logits - m)
        scores = ex / ex.sum()
    else:
        scores = 1 / (1 + torch.exp(-logits))
    from ..routers.topk_softmax import TopKSoftmax

    over_logits = isinstance(s, TopKSoftmax)  # gpt-oss: choose on the (biased) logits, softmax over the k chosen
    basis = logits if over_logits else scores
    choice = [float(basis[e].detach()) + (float(r.bias_E[e]) if r.bias_E is not None else 0.0) for e in range(E)]
    eligible = list(range(E))
    if s.n_group is not None:
        size = E // s.n_group
        group_scores = []
        for g in range(s.n_group):
            members = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            group_scores.append(sum(members[:2]) if s.group_score == "top2sum" else members[0])
        best = sorted(range(s.n_group), key=lambda g: -group_scores[g])[: s.topk_group]
        eligible = [e for e in range(E) if e // size in best]
    chosen = sorted(eligible, key=lambda e: -choice[e])[: s.k]
    weights = [scores[e] for e in chosen]
    if over_logits:
        ex = [torch.exp(logits[e] - max(logits[c] for c in chosen)) for e in chosen]
        weights = [v / sum(ex) for v in ex]
    elif s.normalize:
        total = sum(weights)
        weights = [w / (total + 1e-20) for w in weights]
    weights = [w * s.scale for w in weights]
    return chosen, weights


def _expert(layer, e: int, x_D: Tensor) -> Tensor:
    bank = layer.experts
    h = bank.gate_EFD[e] @ x_D
    if bank.gate_bias_EF is not None:
        h = h + bank.gate_bias_EF[e]
    clamped = getattr(bank.spec, "limit", None) is not None  # gpt-oss's clamped SwiGLU (moekit.experts.clamped)
    if clamped:
        alpha, limit = bank.spec.alpha, bank.spec.limit
        h = h.clamp(max=limit)
        h = h * torch.sigmoid(alpha * h)
    else:
        h = bank.act(h)
    if bank.up_EFD is not None:
        u = bank.up_EFD[e] @ x_D
        if bank.up_bias_EF is not None:
            u = u + bank.up_bias_EF[e]
        h = h * (u.clamp(-limit, limit) + 1 if clamped else u)
    y = bank.w2_EDF[e] @ h
    if bank.b2_ED is not None:
        y = y + bank.b2_ED[e]
    return y


def _shared(layer, x_D: Tensor) -> Tensor:
    sh = layer.shared
    h = sh.w1_FD @ x_D + (sh.b1_F if sh.b1_F is not None else 0)
    h = sh.act(h)
    if sh.w3_FD is not None:
        h = h * (sh.w3_FD @ x_D + (sh.b3_F if sh.b3_F is not None else 0))
    y = sh.w2_DF @ h + (sh.b2_D if sh.b2_D is not None else 0)
    if layer.shared_gate is not None:
        g = layer.shared_gate.weight[0] @ x_D
        y = y / (1 + torch.exp(-g))
    return y


def moe_reference(layer, x: Tensor) -> Tensor:
    """The output of ``layer(x)`` computed token by token (eval-mode routing: no jitter or noise)."""
    D = layer.dim
    x_TD = x.reshape(-1, D)
    T = x_TD.shape[0]
    routes = [_route_token(layer, x_TD[t]) for t in range(T)]

    keep = {(t, j): True for t in range(T) for j in range(len(routes[t][0]))}
    disp = layer.dispatcher
    if isinstance(disp, CapacityDispatcher):
        spec = disp.spec
        K = layer.router.spec.k
        group = x.shape[-2] if (spec.per_sequence and x.dim() >= 3) else T
        num_groups = T // group
        pairs = [(t, j) for j in range(K) for t in range(T)]  # priority order: slot-major, then position
        if spec.drop == "score":
            pairs = sorted(pairs, key=lambda p: -float(routes[p[0]][1][p[1]].detach()))
        if spec.capacity is not None:
            C = spec.capacity
        elif math.isinf(spec.factor):
            C = T * K
        else:
            C = max(1, math.ceil(spec.factor * (T * K // num_groups) / layer.num_experts))
        used: dict[tuple[int, int], int] = {}
        for t, j in pairs:
            key = (t // group, routes[t][0][j])
            used[key] = used.get(key, 0) + 1
            keep[(t, j)] = used[key] <= C

    at_input = getattr(disp, "weight_at", "output") == "input"  # Llama 4: the weight scales the expert's input
    out = []
    for t in range(T):
        y = torch.zeros_like(x_TD[t])
        for j, (e, w) in enumerate(zip(*routes[t])):
            if keep[(t, j)]:
                y = y + (_expert(layer, e, w * x_TD[t]) if at_input else w * _expert(layer, e, x_TD[t]))
        if layer.shared is not None:
            y = y + _shared(layer, x_TD[t])
        out.append(y)
    return torch.stack(out).reshape(x.shape)


def dense_reference(ffn, x: Tensor) -> Tensor:
    """A dense FFN written out (for the 1-expert invariant)."""
    h = ffn.act(x @ ffn.w1_FD.T + (ffn.b1_F if ffn.b1_F is not None else 0))
    if ffn.w3_FD is not None:
        h = h * (x @ ffn.w3_FD.T + (ffn.b3_F if ffn.b3_F is not None else 0))
    return h @ ffn.w2_DF.T + (ffn.b2_D if ffn.b2_D is not None else 0)
