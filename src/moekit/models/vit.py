"""Multi-task vision transformer with MoE FFNs (M3ViT, Liang et al. 2022; Edge-MoE, Sarkar et al. 2023).

Patch embedding -> [CLS; patches] + positions -> blocks -> per-task head. Block i uses an MoE FFN when
``moe_every > 0`` and ``i % moe_every == moe_every - 1`` (M3ViT: odd blocks); the others use a dense FFN.
Block: x += Attn(LN1 x); x += FFN(LN2 x, task). The MoE routes by task, so one forward pass serves one task.

Heads: ``classify`` reads the CLS token (LN -> Linear); ``segment`` maps each patch token to its p x p pixels'
class logits (LN -> Linear(D, p*p*C), SETR-naive style) and folds them back into an image.

Shapes: B images, C channels, H x W image, p patch side, P patches, T = P + 1 tokens, D dim, h heads, E experts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..approx.softmax import SOFTMAX_MODES, online_softmax_stats
from ..balance import CV2Loss
from ..experts import MLP
from ..layer import MoE

_KINDS = ("classify", "segment")
_GELUS = {"exact": "gelu", "table": "gelu_table"}
_SOFTMAX_ROUTERS = ("multi_gate", "task_embed", "task_experts", "pathway")  # routers with a ``softmax`` option


@dataclass(frozen=True, kw_only=True)
class TaskHead:
    name: str
    kind: str  # "classify": one label per image; "segment": one label per pixel
    num_classes: int

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"TaskHead {self.name!r}: unknown kind {self.kind!r}; valid choices: {', '.join(_KINDS)}")
        if self.num_classes < 1:
            raise ValueError(f"TaskHead {self.name!r}: num_classes must be >= 1, got {self.num_classes}")


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    tasks: tuple  # TaskHead per task; the task id is the position here
    image_size: tuple = (12, 20)  # (H, W)
    in_channels: int = 1
    patch_size: int = 4  # p; H and W must be multiples of p
    dim: int = 64  # D
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0  # dense FFN hidden = mlp_ratio * D
    moe_every: int = 2  # 0: dense model; 2: MoE in blocks 1, 3, ... (M3ViT)
    num_experts: int = 8
    k: int = 2
    expert_hidden: int | None = None  # default mlp_ratio * D / k: k active experts cost one dense FFN
    router: dict = field(default_factory=lambda: {"type": "multi_gate"})  # router spec dict; num_tasks is filled in
    cv2_coef: float = 0.01  # M3ViT's gate loss weight (CV^2 importance + load); 0 disables it
    attention_softmax: str = "exact"  # "online": Edge-MoE single-pass softmax in attention
    gelu: str = "exact"  # "table": Edge-MoE table GELU in every FFN
    layer_moe: tuple | None = None  # explicit MoEConfig dicts per MoE block (extracted pathways)

    def __post_init__(self) -> None:
        tasks = tuple(t if isinstance(t, TaskHead) else TaskHead(**t) for t in self.tasks)
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if self.layer_moe is not None:
            object.__setattr__(self, "layer_moe", tuple(self.layer_moe))
        if not tasks:
            raise ValueError("ViTConfig: needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"ViTConfig: task names must be unique, got {names}")
        H, W = self.image_size
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"ViTConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"ViTConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.attention_softmax not in SOFTMAX_MODES:
            raise ValueError(f"ViTConfig: unknown attention_softmax {self.attention_softmax!r}; valid: {SOFTMAX_MODES}")
        if self.gelu not in _GELUS:
            raise ValueError(f"ViTConfig: unknown gelu {self.gelu!r}; valid choices: {', '.join(_GELUS)}")
        if self.moe_every < 0 or self.depth < 1:
            raise ValueError("ViTConfig: depth must be >= 1 and moe_every >= 0")
        if self.layer_moe is not None and len(self.layer_moe) != len(self.moe_blocks):
            raise ValueError(
                f"ViTConfig: layer_moe has {len(self.layer_moe)} entries for {len(self.moe_blocks)} MoE blocks"
            )

    # -- derived --------------------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.dim)

    @property
    def moe_hidden(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else max(1, self.mlp_hidden // self.k)

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        if self.moe_every == 0:
            return ()
        return tuple(i for i in range(self.depth) if i % self.moe_every == self.moe_every - 1)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def moe_config(self, j: int) -> dict:
        """The MoEConfig dict of the j-th MoE block."""
        if self.layer_moe is not None:
            return dict(self.layer_moe[j])
        router = dict(self.router)
        if router.get("type") in ("multi_gate", "task_embed", "task_experts"):
            router.setdefault("num_tasks", len(self.tasks))
        router.setdefault("k", self.k)
        return {
            "dim": self.dim,
            "num_experts": self.num_experts,
            "router": router,
            "experts": MLP(hidden_dim=self.moe_hidden, activation=_GELUS[self.gelu]).to_dict(),
            "balance": [CV2Loss(coef=self.cv2_coef).to_dict()] if self.cv2_coef > 0 else [],
        }

    # -- serialization --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = [dataclasses.asdict(t) for t in self.tasks]
        d["image_size"] = list(self.image_size)
        return json.loads(json.dumps(d))  # plain lists and dicts

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ViTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"ViTConfig.from_dict: expected a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(ViTConfig)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ViTConfig: unknown fields {sorted(unknown)}; valid: {sorted(names)}")
        return ViTConfig(**d)

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, softmax: str = "exact") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.softmax = num_heads, dim // num_heads, softmax
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, T, d)
        a_BhTT = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if self.softmax == "online":
            # Edge-MoE: one sweep gives (m, Z) per query row; exp(a - m) @ V is scaled by 1/Z afterwards
            m, z = online_softmax_stats(a_BhTT)
            o = (torch.exp(a_BhTT - m.unsqueeze(-1)) @ v) / z.unsqueeze(-1)
        else:
            o = a_BhTT.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, config: ViTConfig, moe: dict | None) -> None:
        super().__init__()
        D = config.dim
        self.norm1 = nn.LayerNorm(D)
        self.attn = Attention(D, config.num_heads, config.attention_softmax)
        self.norm2 = nn.LayerNorm(D)
        if moe is None:
            self.ffn = MLP(hidden_dim=config.mlp_hidden, activation=_GELUS[config.gelu]).build_dense(D)
        else:
            self.ffn = MoE.from_config(moe)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x_BTD: Tensor, task: int | None) -> Tensor:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        h = self.norm2(x_BTD)
        if not self.is_moe:
            return x_BTD + self.ffn(h)
        return x_BTD + self.ffn(h, task=task if self.ffn.task_conditioned else None)


class ClassifyHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return self.fc(self.norm(x_BTD[:, 0]))  # (B, C)


class SegmentHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_classes, self.patch_size, self.grid = num_classes, patch_size, grid
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, patch_size * patch_size * num_classes)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, p, C, (gh, gw) = x_BTD.shape[0], self.patch_size, self.num_classes, self.grid
        y = self.fc(self.norm(x_BTD[:, 1:]))  # (B, P, p*p*C)
        y = y.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return y.reshape(B, C, gh * p, gw * p)  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------------------------
class MultiTaskViT(nn.Module):
    """``model(images, task) -> logits`` for one task (a name or an id; optional when there is one task).

    ``images`` is (B, in_channels, H, W). Classification logits are (B, C); segmentation logits (B, C, H, W).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c, D, p = config, config.dim, config.patch_size
        self.patch_embed = nn.Conv2d(c.in_channels, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, D))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        moe_index = {b: j for j, b in enumerate(c.moe_blocks)}
        self.blocks = nn.ModuleList(
            Block(c, c.moe_config(moe_index[i]) if i in moe_index else None) for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(D)
        self.heads = nn.ModuleDict(
            {
                t.name: ClassifyHead(D, t.num_classes) if t.kind == "classify"
                else SegmentHead(D, t.num_classes, p, c.grid)
                for t in c.tasks
            }
        )

    @classmethod
    def from_config(cls, config: ViTConfig | dict) -> "MultiTaskViT":
        return cls(config if isinstance(config, ViTConfig) else ViTConfig.from_dict(config))

    # -- input checks ---------------------------------------------------------------------------------------
    def task_index(self, task: str | int | Tensor | None) -> int:
        """The integer id of ``task`` (a name or an id); clear errors for anything else."""
        names = self.config.task_names
        if task is None:
            if len(names) == 1:
                return 0
            raise ValueError(f"this model has {len(names)} tasks; pass task= one of {', '.join(names)}")
        if isinstance(task, Tensor) and task.dim() == 0 and not task.is_floating_point():
            task = int(task)
        if isinstance(task, str):
            if task not in names:
                raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(names)}")
            return names.index(task)
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < len(names):
                raise ValueError(f"unknown task id {task}; valid ids are 0..{len(names) - 1} ({', '.join(names)})")
            return task
        raise ValueError(f"task must be a task name or an integer id, got {type(task).__name__}")

    def check_images(self, images: Tensor) -> None:
        c = self.config
        want = ", ".join(map(str, (c.in_channels, *c.image_size)))
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a tensor of shape (B, {want}), got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be 4-D (B, C, H, W) = (B, {want}), got shape {tuple(images.shape)}")
        if images.shape[1] != c.in_channels:
            raise ValueError(f"images have {images.shape[1]} channels; this model expects {c.in_channels}")
        if tuple(images.shape[2:]) != c.image_size:
            raise ValueError(f"images are {tuple(images.shape[2:])} (H, W); this model expects {c.image_size}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, got {images.dtype}")

    # -- forward --------------------------------------------------------------------------------------------
    def features(self, images: Tensor, task: int) -> Tensor:
        """Encoder output (B, T, D) for task id ``task`` (routing depends on the task)."""
        x_BDgg = self.patch_embed(images)
        x_BPD = x_BDgg.flatten(2).transpose(1, 2)
        x_BTD = torch.cat([self.cls_token.expand(x_BPD.shape[0], -1, -1), x_BPD], dim=1) + self.pos_embed
        for block in self.blocks:
            x_BTD = block(x_BTD, task)
        return self.norm(x_BTD)

    def forward(self, images: Tensor, task: str | int | None = None) -> Tensor:
        self.check_images(images)
        t = self.task_index(task)
        return self.heads[self.config.tasks[t].name](self.features(images, t))

    @property
    def task_dependent(self) -> bool:
        """True when the encoder's output depends on the task (any MoE block routes by task)."""
        return any(b.is_moe for b in self.blocks)

    def forward_all(self, images: Tensor) -> dict[str, Tensor]:
        """Logits of every task. A task-routed model runs the encoder once per task; a dense one runs it once."""
        self.check_images(images)
        if self.task_dependent:
            return {t.name: self.heads[t.name](self.features(images, i)) for i, t in enumerate(self.config.tasks)}
        feats = self.features(images, 0)
        return {t.name: self.heads[t.name](feats) for t in self.config.tasks}

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]


def with_approximations(model: MultiTaskViT, *, softmax: str = "online", gelu: str = "table") -> MultiTaskViT:
    """A copy of ``model`` using Edge-MoE's approximations (online softmax in gates and attention, table GELU),
    with the same weights. Only routers with a ``softmax`` option (the task routers) switch their gate."""
    c = model.config
    router = dict(c.router)
    if router.get("type") in _SOFTMAX_ROUTERS:
        router["softmax"] = softmax
    layer_moe = None
    if c.layer_moe is not None:
        layer_moe = []
        for d in c.layer_moe:
            d = json.loads(json.dumps(d))
            if d["router"].get("type") in _SOFTMAX_ROUTERS:
                d["router"]["softmax"] = softmax
            d["experts"]["activation"] = _GELUS[gelu]
            layer_moe.append(d)
        layer_moe = tuple(layer_moe)
    new = MultiTaskViT(c.replace(router=router, attention_softmax=softmax, gelu=gelu, layer_moe=layer_moe))
    new.load_state_dict(model.state_dict())
    return new.train(model.training)
