"""Single-task pathway extraction (M3ViT's single-task inference, Edge-MoE's per-task expert subsets).

``extract_task(model, task)`` returns a standalone :class:`MultiTaskViT` with one task: the shared backbone, that
task's head, and in every MoE block only the experts the task uses plus a fixed :class:`PathwayGate`.

- **Task-level routing** (``task_experts``): the task can only ever reach its own experts, so the pathway keeps
  exactly those, with the task's own gate. Outputs are identical to the full model's for that task.
- **Token-level routing** (``multi_gate``, ``task_embed``): any expert could be chosen, so the experts kept are
  picked from routing statistics on a calibration set: the most used experts until ``coverage`` of the routed
  pairs is reached (at least k, at most ``max_experts``). The pathway keeps the task's whole gate (E x D, small),
  so combine weights are still the full-softmax probabilities; dropped experts are just never selected. Without
  calibration data every expert is kept (exact, no saving). Measure the agreement with
  :func:`pathway_agreement`. For the task-embedding gate the task vector is folded into the gate's bias:
  [x; tau_t] W^T = x W_x^T + (W_tau tau_t).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..routers.task import PathwayGate
from .evaluate import expert_usage, predict
from .vit import MultiTaskViT


def _slice_bank(experts: torch.nn.Module, num_experts: int, idx: Tensor) -> dict[str, Tensor]:
    """The bank's per-expert tensors (leading dim E, whatever their names) restricted to experts ``idx``."""
    return {n: t.detach().index_select(0, idx) for n, t in experts.state_dict().items()
            if t.dim() >= 1 and t.shape[0] == num_experts}


def _keep_by_usage(usage_E: Tensor, k: int, coverage: float, max_experts: int | None) -> list[int]:
    order = torch.argsort(usage_E, descending=True, stable=True).tolist()
    cum, kept = 0.0, []
    total = float(usage_E.sum())
    for e in order:
        if len(kept) >= k and cum >= coverage * total - 1e-12:
            break
        kept.append(e)
        cum += float(usage_E[e])
    if max_experts is not None:
        kept = kept[:max(k, max_experts)]
    return sorted(kept)


@torch.no_grad()
def extract_task(model: MultiTaskViT, task: str | int, *, calibration: Tensor | None = None, coverage: float = 1.0,
                 max_experts: int | None = None) -> MultiTaskViT:
    """A standalone single-task model holding only the experts, gates and head ``task`` uses (see module doc).

    Args:
        model: a multi-task model whose MoE blocks use task routers.
        task: task name or id.
        calibration: images (B, C, H, W) whose routing statistics choose the experts of token-level routers.
        coverage: keep the most used experts until this fraction of the calibration pairs is covered.
        max_experts: cap on the experts kept per layer (token-level routers only; at least k are kept).
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"extract_task: coverage must be in (0, 1], got {coverage}")
    t = model.task_index(task)
    head = model.config.tasks[t]
    layers = model.moe_layers()
    usage = None
    for j, moe in enumerate(layers):
        if not moe.task_conditioned or moe.router_spec is None:
            raise ValueError(
                f"extract_task: MoE layer {j} uses {type(moe.router).__name__}; pathway extraction needs a task "
                "router (multi_gate, task_embed or task_experts)"
            )
    if calibration is not None and any(not m.router_spec.task_level for m in layers):
        usage = expert_usage(model, calibration, t)

    layer_moe, moe_state = [], []
    for j, moe in enumerate(layers):
        r = moe.router
        w_SD, b_S, owned = r.task_gate(t)
        if owned is not None:  # task-level routing: the task's own experts, exactly
            kept = owned
            expert_S = torch.arange(len(kept))
        else:  # token-level routing: keep the experts the calibration set used
            E = moe.num_experts
            kept = list(range(E)) if usage is None else _keep_by_usage(usage[j], r.spec.k, coverage, max_experts)
            local = {e: i for i, e in enumerate(kept)}
            expert_S = torch.tensor([local.get(e, -1) for e in range(E)])
        spec = r.spec
        gate = PathwayGate(num_scores=w_SD.shape[0], k=spec.k, normalize=spec.normalize, softmax=spec.softmax)
        d = moe.config.to_dict()
        layer_moe.append({**d, "num_experts": len(kept), "router": gate.to_dict(), "balance": []})
        idx = torch.tensor(kept)
        bank = _slice_bank(moe.experts, moe.num_experts, idx)
        moe_state.append({"router.weight_SD": w_SD, "router.bias_S": b_S, "router.expert_S": expert_S,
                          **{f"experts.{n}": v for n, v in bank.items()}})

    config = model.config.replace(tasks=(head,), layer_moe=tuple(layer_moe))
    ref = next(model.parameters())
    pathway = MultiTaskViT(config).to(device=ref.device, dtype=ref.dtype)
    source = model.state_dict()
    moe_prefix = {f"blocks.{i}.ffn.": j for j, i in enumerate(model.config.moe_blocks)}
    state = {}
    for key in pathway.state_dict():
        prefix = next((p for p in moe_prefix if key.startswith(p)), None)
        if prefix is not None:
            state[key] = moe_state[moe_prefix[prefix]][key[len(prefix):]]
        else:
            state[key] = source[key]
    pathway.load_state_dict(state)
    return pathway.train(model.training)


@torch.no_grad()
def pathway_agreement(model: MultiTaskViT, pathway: MultiTaskViT, task: str | int, images: Tensor) -> dict[str, float]:
    """How closely ``pathway`` reproduces ``model`` on ``task``: the fraction of identical predictions (per image
    or per pixel) and the largest absolute logit difference."""
    name = model.config.tasks[model.task_index(task)].name
    full = predict(model, images, name)
    part = predict(pathway, images, None)
    return {
        "prediction_agreement": float((full.argmax(1) == part.argmax(1)).double().mean()),
        "max_abs_logit_diff": float((full - part).abs().max()),
    }
