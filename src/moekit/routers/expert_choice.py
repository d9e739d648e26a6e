"""Expert-choice routing: every expert picks its top tokens (Zhou et al. 2022, "Mixture-of-Experts with Expert
Choice Routing", NeurIPS 2022, arXiv:2202.09368).

S = softmax(x W_g) over experts, per token. Expert e takes the C tokens with the largest S[:, e], with
C = ceil(capacity_factor * T / E) (the paper's k = n * c / e, c = 2 by default), and token t's output is
sum over the experts that picked it of S[t, e] * FFN_e(x_t). A token may get zero, one or several experts; every
expert gets exactly C tokens, so the load is balanced by construction and no balance loss is needed.

**Not causal.** Which tokens an expert takes depends on every token in the call, later positions included, so the
output at position t depends on the future. Do not use it in an autoregressive decoder (training or decoding)
unless each call holds only tokens that may see each other.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..assignment import Assignment
from ..spec import register_spec
from ._gate import linear_logits
from ..protocols import RouteContext
from .base import Router, RouterSpec


@register_spec("expert_choice", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertChoice(RouterSpec):
    """Expert-choice routing (Zhou et al. 2022). Not causal: see the module docstring.

    Args:
        capacity_factor: c; each expert takes C = ceil(c * T / E) of the T tokens in the call (at most T), so on
            average a token gets c experts. The paper's default is 2.
        capacity: an absolute per-expert capacity C instead of ``capacity_factor`` (clipped to T).
        router_bias: a bias on the router's linear map.
        fp32: route in float32 when the input is half precision.
    """

    capacity_factor: float = 2.0
    capacity: int | None = None
    router_bias: bool = False
    fp32: bool = True

    def __post_init__(self) -> None:
        if self.capacity is not None:
            if self.capacity <= 0:
                raise ValueError(f"ExpertChoice: capacity must be a positive integer, got {self.capacity}")
        elif not self.capacity_factor > 0:
            raise ValueError(f"ExpertChoice: capacity_factor must be > 0, got {self.capacity_factor}")

    def tokens_per_expert(self, num_tokens: int, num_experts: int) -> int:
        """C for a call with ``num_tokens`` tokens."""
        if self.capacity is not None:
            c = self.capacity
        else:
            c = math.ceil(self.capacity_factor * num_tokens / num_experts)
        return min(num_tokens, c)

    def build(self, dim: int, num_experts: int) -> "ExpertChoiceRouter":
        return ExpertChoiceRouter(dim, num_experts, self)


class ExpertChoiceRouter(Router):
    def __init__(self, dim: int, num_experts: int, spec: ExpertChoice) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts = num_experts
        self.gate = nn.Linear(dim, num_experts, bias=spec.router_bias)

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = linear_logits(self.gate, x_TD, self.spec.fp32)
        scores_TE = logits_TE.softmax(-1)
        C = self.spec.tokens_per_expert(T, E)
        # each expert's top-C tokens; pairs are listed rank-major (every expert's first pick, then second, ...)
        weight_CE, token_CE = scores_TE.topk(C, dim=0)
        expert_CE = torch.arange(E, device=x_TD.device).expand(C, E)
        return Assignment(
            token_N=token_CE.reshape(-1),
            expert_N=expert_CE.reshape(-1),
            weight_N=weight_CE.reshape(-1).to(x_TD.dtype),
            num_tokens=T,
            num_experts=E,
            scores_TE=scores_TE,
            logits_TE=logits_TE,
        )

    def extra_repr(self) -> str:
        s = self.spec
        return f"capacity_factor={s.capacity_factor}, capacity={s.capacity} (not causal)"
