"""Analytic FLOPs of a :class:`ViTConfig` per image, counted from the configuration.

Convention: matrix products only, 2 FLOPs per multiply-add (what ``torch.utils.flop_counter`` counts); biases,
norms, softmax, GELU and the routing bookkeeping are not counted. With T = P + 1 tokens:

- patch embedding: P * (C p^2) * D * 2
- attention per block: qkv T*D*3D*2, scores T*T*D*2, weighted values T*T*D*2, output projection T*D*D*2
- dense FFN: T * 2 * D * F * 2
- MoE gate: T * D_in * S * 2 with S the gate's score columns for the task (E for multi-gate, the task's own
  experts for task-level routing; D_in = D + task_dim for the task-embedding gate, whose per-call embedding MLP
  is not counted)
- MoE experts: T * k * 2 * D * F_e * 2 (each token runs k experts; ``experts="all"`` counts every expert)
- heads: classification D * C * 2 on the CLS token; segmentation P * D * (p^2 C) * 2
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..spec import spec_from_dict
from .vit import MultiTaskViT, ViTConfig


@dataclass(frozen=True)
class Flops:
    patch_embed: int = 0
    attention: int = 0
    dense_ffn: int = 0
    gate: int = 0
    experts: int = 0
    heads: int = 0

    @property
    def total(self) -> int:
        return self.patch_embed + self.attention + self.dense_ffn + self.gate + self.experts + self.heads

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _gate_macs(moe: dict, task: int) -> float:
    """Multiply-adds per token of an MoE block's gate for ``task`` (the router spec says)."""
    spec = spec_from_dict("router", moe["router"])
    return spec.flops_per_token(moe["dim"], moe["num_experts"], task=task)


def _expert_hidden(moe: dict) -> int:
    h = moe["experts"].get("hidden_dim")
    return h if h is not None else 4 * moe["dim"]


def vit_flops(config: ViTConfig | MultiTaskViT, task: str | int | None = None, *, experts: str = "active") -> Flops:
    """FLOPs per image of one task's forward pass (encoder + that task's head).

    ``experts="active"`` counts the k routed experts per token; ``"all"`` counts every expert of each MoE block
    (the cost of running the whole multi-task model's experts densely).
    """
    if isinstance(config, MultiTaskViT):
        config = config.config
    if experts not in ("active", "all"):
        raise ValueError(f"vit_flops: experts must be 'active' or 'all', got {experts!r}")
    c = config
    names = c.task_names
    if task is None:
        if len(names) != 1:
            raise ValueError(f"vit_flops: this model has {len(names)} tasks; pass task= one of {', '.join(names)}")
        task = 0
    if isinstance(task, str):
        if task not in names:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(names)}")
        task = names.index(task)
    if not 0 <= task < len(names):
        raise ValueError(f"unknown task id {task}; valid ids are 0..{len(names) - 1}")
    P, D, p = c.num_patches, c.dim, c.patch_size
    T = P + 1
    patch = P * (c.in_channels * p * p) * D * 2
    attn_block = T * D * 3 * D * 2 + 2 * (T * T * D * 2) + T * D * D * 2
    dense = gate = expert = 0
    moe_blocks = c.moe_blocks
    for i in range(c.depth):
        if i not in moe_blocks:
            dense += T * 2 * D * c.mlp_hidden * 2
            continue
        moe = c.moe_config(moe_blocks.index(i))
        gate += int(T * _gate_macs(moe, task) * 2)
        k = moe["num_experts"] if experts == "all" else int(moe["router"].get("k", 2))
        expert += T * k * 2 * D * _expert_hidden(moe) * 2
    head_spec = c.tasks[task]
    head = D * head_spec.num_classes * 2 if head_spec.kind == "classify" else P * D * p * p * head_spec.num_classes * 2
    return Flops(patch, attn_block * c.depth, dense, gate, expert, head)


def vit_flops_all_tasks(config: ViTConfig | MultiTaskViT, *, experts: str = "active") -> Flops:
    """FLOPs per image for every task's output. A model whose routing depends on the task (any MoE block) runs
    the encoder once per task; a dense (or task-agnostic) model runs it once and then every head."""
    if isinstance(config, MultiTaskViT):
        config = config.config
    tasks = range(len(config.tasks))
    if config.moe_blocks:
        total = Flops()
        for t in tasks:
            total = total + vit_flops(config, t, experts=experts)
        return total
    one = vit_flops(config, 0)
    heads = sum(vit_flops(config, t).heads for t in tasks)
    return Flops(one.patch_embed, one.attention, one.dense_ffn, one.gate, one.experts, heads)


def count_params(model) -> int:
    """Parameters (not buffers) of a module."""
    return sum(p.numel() for p in model.parameters())


def expert_pair_flops_E(experts, dim: int, num_experts: int):
    """Forward FLOPs (matmuls, 2 per multiply-add) of one (token, expert) pair for each expert, from the layer's
    expert spec: ``FFN`` family ``2 (3 if glu else 2) D F``; specs with their own shape (HeteroFFN, AoEExperts)
    say so with ``pair_flops_E(dim, num_experts)``."""
    import torch

    from ..experts.bank import FFN

    if isinstance(experts, FFN):
        F_ = experts.hidden(dim)
        return torch.full((num_experts,), 2.0 * (3 if experts.glu else 2) * dim * F_, dtype=torch.float64)
    return experts.pair_flops_E(dim, num_experts)


def moe_router_flops(layer) -> float:
    """Forward FLOPs per token of an MoE layer's router, from its spec (2 per multiply-add)."""
    spec = layer.router_spec
    if spec is None:
        raise ValueError("moe_router_flops: the layer was built from a router module, not a spec")
    return 2.0 * spec.flops_per_token(layer.dim, layer.num_experts, experts=layer.config.experts)
