"""Evaluation: per-task accuracy, segmentation mIoU, expert usage per task and layer, latency per image."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..layer import MoE
from ..stats import track_routing
from .vit import MultiTaskViT


@torch.no_grad()
def predict(model: MultiTaskViT, images: Tensor, task: str | int | None = None, *, batch_size: int = 500) -> Tensor:
    """Logits of one task over ``images``, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + batch_size], task) for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def confusion(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts, rows = target class, columns = predicted class."""
    return torch.bincount(target.reshape(-1) * num_classes + pred.reshape(-1), minlength=num_classes**2).view(
        num_classes, num_classes
    )


def task_metrics(kind: str, logits: Tensor, target: Tensor) -> dict[str, float]:
    """``accuracy`` (per image or per pixel); for segmentation also ``miou``: mean over classes of
    TP / (TP + FP + FN) from the confusion matrix of the whole set (classes absent from both are skipped)."""
    pred = logits.argmax(1)
    out = {"accuracy": float((pred == target).double().mean())}
    if kind == "segment":
        cm = confusion(pred, target, logits.shape[1]).double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        out["miou"] = float((tp[present] / union[present]).mean())
    return out


def evaluate(model: MultiTaskViT, data, tasks=None, *, batch_size: int = 500) -> dict[str, dict[str, float]]:
    """Metrics of every task of ``model`` (or the named ``tasks``) on ``data`` (images + targets by task name)."""
    names = model.config.task_names if tasks is None else tuple(tasks)
    out = {}
    for name in names:
        head = model.config.tasks[model.task_index(name)]
        out[name] = task_metrics(head.kind, predict(model, data.images, name, batch_size=batch_size),
                                 data.targets[name])
    return out


@torch.no_grad()
def expert_usage(model: MultiTaskViT, images: Tensor, task: str | int | None = None, *,
                 batch_size: int = 500) -> Tensor:
    """(L, E) fraction of each MoE layer's routed (token, expert) pairs that went to each expert for ``task``."""
    t = model.task_index(task)
    was_training = model.training
    model.eval()
    try:
        with track_routing(model) as stats:
            for i in range(0, len(images), batch_size):
                model(images[i:i + batch_size], t)
    finally:
        model.train(was_training)
    names = [n for n, m in model.named_modules() if isinstance(m, MoE)]
    rows = [stats[n].routed_per_expert_E.double() for n in names]
    return torch.stack([r / r.sum().clamp_min(1) for r in rows]) if rows else torch.zeros(0, 0)


@torch.no_grad()
def latency_per_image(fn, images: Tensor, *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds per image of ``fn(images)`` over ``repeats`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] / len(images)
