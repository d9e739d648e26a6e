"""SMoE-Dropout (Chen et al. 2023, "Sparse MoE as the New Dropout: Scaling Dense and Self-Slimmable Transformers",
ICLR 2023, arXiv:2303.01610).

The router is randomly initialised and *frozen* (its weights are buffers, not parameters). Each token takes the
top-k experts by logit l = x W + b, weighted by a softmax over those k logits. During training k rises linearly from
``k_min`` to ``k_max`` over ``total_steps`` (the authors: 16 experts, k from 8 to 16 over 400k steps on enwik8), so
the model learns to work with any number of active experts; at inference any k can be chosen ("self-slimmable"),
with quality rising with k. No balance loss.

The schedule is explicit state: ``router.step`` (a buffer) advances only when the training loop calls
:func:`advance_smoe_dropout` (or ``router.advance()``); :func:`set_inference_k` picks the k used in eval mode.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..assignment import Assignment
from ..spec import register_spec
from ..protocols import RouteContext
from .base import Router, RouterSpec


@register_spec("smoe_dropout", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SMoEDropout(RouterSpec):
    """Frozen random router with a growing k (Chen et al. 2023).

    Args:
        k_min: k at step 0.
        k_max: k at and after ``total_steps`` (None = all experts); also the default inference k.
        total_steps: optimizer steps over which k rises linearly: k(s) = k_min + floor((k_max - k_min) s / total).
        router_bias: a (frozen) bias on the router.
    """

    k_min: int = 1
    k_max: int | None = None
    total_steps: int = 1000
    router_bias: bool = True

    def __post_init__(self) -> None:
        if self.k_min < 1:
            raise ValueError(f"SMoEDropout: k_min must be >= 1, got {self.k_min}")
        if self.k_max is not None and self.k_max < self.k_min:
            raise ValueError(f"SMoEDropout: k_max={self.k_max} is smaller than k_min={self.k_min}")
        if self.total_steps < 1:
            raise ValueError(f"SMoEDropout: total_steps must be >= 1, got {self.total_steps}")

    def validate(self, num_experts: int) -> None:
        if (self.k_max or num_experts) > num_experts or self.k_min > num_experts:
            raise ValueError(f"SMoEDropout: k_min/k_max must be <= the number of experts ({num_experts})")

    def for_step_budget(self, steps: int) -> "SMoEDropout":
        return dataclasses.replace(self, total_steps=max(1, steps))

    def build(self, dim: int, num_experts: int) -> "SMoEDropoutRouter":
        self.validate(num_experts)
        return SMoEDropoutRouter(dim, num_experts, self)


class SMoEDropoutRouter(Router):
    def __init__(self, dim: int, num_experts: int, spec: SMoEDropout) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts = num_experts
        self.k_max = spec.k_max or num_experts
        init = nn.Linear(dim, num_experts, bias=spec.router_bias)  # nn.Linear's random init, then frozen
        self.register_buffer("weight_ED", init.weight.detach().clone())
        self.register_buffer("bias_E_frozen", None if init.bias is None else init.bias.detach().clone())
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.inference_k: int | None = None

    @property
    def train_k(self) -> int:
        s = self.spec
        progress = min(int(self.step), s.total_steps)
        return s.k_min + math.floor((self.k_max - s.k_min) * progress / s.total_steps)

    @property
    def current_k(self) -> int:
        if self.training:
            return self.train_k
        return self.inference_k if self.inference_k is not None else self.k_max

    def advance(self, steps: int = 1) -> None:
        self.step += steps

    def set_inference_k(self, k: int | None) -> None:
        if k is not None and not 1 <= k <= self.num_experts:
            raise ValueError(f"SMoEDropout: inference k must be in [1, {self.num_experts}], got {k}")
        self.inference_k = k

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        w = self.weight_ED.to(x_TD.dtype)
        b = None if self.bias_E_frozen is None else self.bias_E_frozen.to(x_TD.dtype)
        logits_TE = F.linear(x_TD, w, b)
        top_TK, idx_TK = logits_TE.topk(self.current_k, dim=-1)
        return Assignment.from_topk(idx_TK, top_TK.softmax(-1), self.num_experts, logits_TE.softmax(-1), logits_TE)

    def extra_repr(self) -> str:
        s = self.spec
        return f"k {s.k_min}->{self.k_max} over {s.total_steps} steps, step={int(self.step)}, frozen router"


def _routers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, SMoEDropoutRouter)]


def advance_smoe_dropout(model: nn.Module, steps: int = 1) -> None:
    """Advance the k schedule of every SMoE-Dropout router in ``model``; call once per optimizer step."""
    for r in _routers(model):
        r.advance(steps)


def set_inference_k(model: nn.Module, k: int | None) -> None:
    """Use ``k`` experts per token in eval mode in every SMoE-Dropout router of ``model`` (None: k_max)."""
    for r in _routers(model):
        r.set_inference_k(k)
