"""Pre-gated MoE's pre-gate, as a prefetch predictor: a small linear model per layer, trained on calibration text,
that predicts layer L+1's experts from layer L's MoE input.

The default prefetcher reuses layer L+1's own router on layer L's input (the residual stream drifts little between
layers). Pre-gated MoE instead trains a gate for that job. Here each pre-gate ``P[L+1]`` is an ``nn.Linear(D, E)``
initialised from layer L+1's router (so it starts at the router-reuse prediction) and fitted with binary
cross-entropy to the experts layer L+1 actually routes each calibration token to (multi-hot targets), from layer L's
experts-module input. The model itself is not changed: the pre-gate only decides what to load early, so outputs stay
exact. ``load_offloaded(..., prefetch=True, pregate=P)`` uses it; :func:`prediction_quality` scores any predictor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .calibrate import record_experts_calls
from .prefetch import router_topk


def _experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from .experts import OffloadedExperts
    from .loader import is_hf_experts

    return [m for m in model.modules() if isinstance(m, OffloadedExperts) or is_hf_experts(m)]


@torch.no_grad()
def record_routing(model: torch.nn.Module, token_batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per experts layer (in model order): its inputs ``x [T, D]`` and routed experts ``idx [T, K]`` on the batches."""
    mods = _experts_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no experts module")
    calls = record_experts_calls(model, mods, token_batches)
    return [(torch.cat([x.float() for x, _, _ in c]), torch.cat([i for _, i, _ in c])) for c in calls]


def train_pregate(model: torch.nn.Module, token_batches: list[torch.Tensor], routers: dict[int, torch.nn.Module],
                  steps: int = 300, lr: float = 1e-2, weight_decay: float = 0.0) -> dict[int, torch.nn.Linear]:
    """Pre-gates ``{L + 1: Linear}`` for every pair of consecutive experts layers, fitted on ``token_batches``.

    ``routers[L]``: layer L's router module (``weight [E, D]``, optional ``bias``), the initialisation."""
    if steps < 0:
        raise ValueError(f"steps={steps}: expected >= 0")
    rec = record_routing(model, token_batches)
    out = {}
    for L in range(len(rec) - 1):
        r = routers.get(L + 1)
        if r is None:
            continue
        x, _ = rec[L]
        _, idx = rec[L + 1]
        E, D = r.weight.shape
        target = torch.zeros(idx.shape[0], E).scatter_(1, idx, 1.0)
        lin = torch.nn.Linear(D, E)
        with torch.no_grad():
            lin.weight.copy_(r.weight.float())
            b = getattr(r, "bias", None)
            lin.bias.copy_(b.float() if isinstance(b, torch.Tensor) else torch.zeros(E))
        opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                F.binary_cross_entropy_with_logits(lin(x), target).backward()
                opt.step()
        lin.requires_grad_(False)
        out[L + 1] = lin.to(r.weight.dtype)
    return out


@torch.no_grad()
def prediction_quality(rec: list[tuple[torch.Tensor, torch.Tensor]], predictors: dict[int, torch.nn.Module],
                       k: int | None = None) -> dict[str, float]:
    """Per-token precision / recall of predicting layer L+1's top-k experts from layer L's input with
    ``predictors[L + 1]`` (a router or a pre-gate), over every layer pair with a predictor."""
    correct = total = 0
    for L in range(len(rec) - 1):
        p = predictors.get(L + 1)
        if p is None:
            continue
        x, _ = rec[L]
        _, idx = rec[L + 1]
        kk = k or idx.shape[1]
        pred = router_topk(p, x, kk)
        hit = (pred[:, :, None] == idx[:, None, :]).any(-1).sum().item()
        correct += hit
        total += idx.numel()
    r = correct / total if total else 0.0
    return {"precision": r, "recall": r, "correct": correct, "actual": total}  # k predicted per k actual: P = R
