"""Calibration statistics of every experts module of a (fully loaded) HF MoE model, for pruning and merging.

We record each experts module's inputs and routing on calibration tokens (a forward hook), then compute per expert:
routed-slot frequency, REAP's score (mean over routed slots of router weight x expert output norm), and the mean
output, using the module's own per-expert arithmetic (its eager implementation on a one-expert proxy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .loader import find_experts_modules
from .proxy import ExpertsProxy, resolve_inner


@dataclass
class LayerCalib:
    path: str
    x_TD: torch.Tensor          # inputs of the experts module (capped at max_tokens)
    idx_TK: torch.Tensor
    w_TK: torch.Tensor
    freq_E: torch.Tensor = field(default=None)
    reap_E: torch.Tensor = field(default=None)
    mean_out_ED: torch.Tensor = field(default=None)


def expert_forward(module: torch.nn.Module, e: int, x_TD: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    """Expert ``e`` of an HF experts module applied to ``x_TD`` (no routing weight), via its eager implementation."""
    from .layout import expert_params

    fn, _ = resolve_inner("eager", module)
    w = weights if weights is not None else {p: getattr(module, p)[e:e + 1] for p in expert_params(module)}
    proxy = ExpertsProxy(module, w, 1)
    T = x_TD.shape[0]
    return fn(proxy, x_TD, torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1, dtype=x_TD.dtype))


_CALL_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


@torch.no_grad()
def record_experts_calls(model: torch.nn.Module, modules: list[torch.nn.Module],
                         token_batches: list[torch.Tensor]) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Run ``model`` on each batch and record, per experts module of ``modules`` (in that order), every call's inputs:
    ``(x [T, D], idx [T, K], w [T, K])`` (positional or keyword, as transformers calls the experts)."""
    rec: list[list] = [[] for _ in modules]
    hooks = []
    for i, m in enumerate(modules):
        def hook(mod, args, kwargs, _i=i):
            x, idx, w = list(args[:3]) + [kwargs.get(k) for k in _CALL_ARGS[len(args[:3]):]]
            T = x.numel() // x.shape[-1]
            rec[_i].append((x.detach().reshape(T, x.shape[-1]), idx.detach().reshape(T, -1), w.detach().reshape(T, -1)))
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for ids in token_batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return rec


@torch.no_grad()
def calibrate(model: torch.nn.Module, token_batches: list[torch.Tensor], max_tokens: int = 4096) -> list[LayerCalib]:
    experts = find_experts_modules(model)
    if not experts:
        raise ValueError(f"{type(model).__name__} has no experts module decorated with use_experts_implementation")
    calls = record_experts_calls(model, [m for _, m in experts], token_batches)
    rec = {path: c for (path, _), c in zip(experts, calls)}
    out = []
    for path, m in experts:
        xs, idxs, ws = zip(*rec[path])
        x, idx, w = torch.cat(xs)[:max_tokens], torch.cat(idxs)[:max_tokens], torch.cat(ws)[:max_tokens]
        E = m.num_experts
        freq = torch.bincount(idx.flatten(), minlength=E)[:E].double()
        reap = torch.zeros(E, dtype=torch.float64)
        mean_out = torch.zeros(E, x.shape[-1], dtype=torch.float64)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            y = expert_forward(m, e, x[tok])
            reap[e] = (w[tok, slot].double() * y.double().norm(dim=-1)).mean()
            mean_out[e] = y.double().mean(0)
        out.append(LayerCalib(path, x, idx, w, freq, reap, mean_out))
    return out
