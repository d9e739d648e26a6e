"""Predict the next layer's experts and load them in a background thread while this layer computes.

At layer L's experts call we apply layer L+1's router weights to layer L's MoE input (the residual stream changes
little from one layer to the next; mixtral-offloading and ProMoE use the same speculation) and queue the predicted
experts of L+1 for loading on one worker thread, which overlaps disk reads with layer L's expert compute. When layer
L+1 runs, its actual experts are compared with the prediction: precision = |predicted & actual| / |predicted|,
recall = |predicted & actual| / |actual|, summed over calls.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefetchStats:
    predicted: int = 0   # experts predicted (summed over calls)
    actual: int = 0      # experts actually routed in layers that had a prediction
    correct: int = 0     # predicted and routed

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.actual if self.actual else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"predicted": self.predicted, "actual": self.actual, "correct": self.correct,
                "precision": self.precision, "recall": self.recall}


def router_topk(router: torch.nn.Module, x_TD: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k expert ids per token from a router module's weight (and bias / score-correction bias if present)."""
    w = router.weight
    logits = F.linear(x_TD.to(w.dtype), w, getattr(router, "bias", None) if isinstance(getattr(router, "bias", None), torch.Tensor) else None)
    corr = getattr(router, "e_score_correction_bias", None)
    if isinstance(corr, torch.Tensor):
        logits = torch.sigmoid(logits.float()) + corr.float()
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


class Prefetcher:
    """Owns the worker thread. ``routers[L]``: layer L's router module (None for layers without one)."""

    def __init__(self, cache, routers: dict[int, torch.nn.Module], top_k: dict[int, int], max_experts: int):
        self.cache, self.routers, self.top_k = cache, routers, top_k
        self.max_experts = max(1, max_experts)
        self.stats = PrefetchStats()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
        self._pending: dict[int, set[int]] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def submit(self, next_layer: int, x_TD: torch.Tensor) -> None:
        """Predict ``next_layer``'s experts from ``x_TD`` and queue their loads."""
        router = self.routers.get(next_layer)
        if router is None:
            return
        with torch.no_grad():
            ids_TK = router_topk(router, x_TD, self.top_k[next_layer])
        if ids_TK.numel() <= self.max_experts:  # decoding: every predicted expert, no ranking needed
            chosen = list(dict.fromkeys(ids_TK.reshape(-1).tolist()))
        else:
            ids, counts = torch.unique(ids_TK, return_counts=True)
            order = counts.argsort(descending=True)[: self.max_experts]
            chosen = ids[order].tolist()
        with self._lock:
            self._pending[next_layer] = set(chosen)
        cached = self.cache.items
        todo = [e for e in chosen if (next_layer, e) not in cached]  # a dict read: atomic; the worker re-checks
        if todo:  # nothing to load (all cached): no hand-off to the worker thread at all
            self._pool.submit(self._load, next_layer, todo)

    def _load(self, layer: int, ids: list[int]) -> None:
        try:
            for e in ids:
                self.cache.prefetch((layer, e))
        except BaseException as err:  # surfaced on the compute thread by observe()
            self._error = err

    def observe(self, layer: int, actual: list[int]) -> None:
        """Score the prediction made for ``layer`` against the experts it actually routed to."""
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"expert prefetch for layer {layer} failed: {err}") from err
        with self._lock:
            pred = self._pending.pop(layer, None)
        if pred is None:
            return
        a = set(actual)
        self.stats.predicted += len(pred)
        self.stats.actual += len(a)
        self.stats.correct += len(pred & a)

    def drain(self) -> None:
        """Wait for queued loads (used by tests and before reading statistics)."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
