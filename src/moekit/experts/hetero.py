"""Heterogeneous expert sizes (Wang et al. 2024, "HMoE: Heterogeneous Mixture of Experts for Language Modeling",
arXiv:2408.10681) and HMoE's parameter penalty (P-Penalty) loss.

Experts have different hidden sizes F_e (the total usually matched to a homogeneous MoE). With any router, a
size-blind load-balancing loss pushes tokens evenly onto small and large experts; HMoE instead penalises routing in
proportion to expert size, so that the small experts take most tokens and the large ones are kept for the tokens
that need them:

    L_P = E * sum_e (f_e * F_e / mean(F)) * P_e

with f_e the fraction of routed pairs that go to e and P_e the mean router probability of e (our reading of the
paper: a Switch-style loss with f weighted by normalised size; the formula is recalled, not checked against code).
With equal sizes it is the Switch loss.

The weights of all experts are stored concatenated along the hidden axis (``w1_SD``, ``w3_SD``, ``w2_DS`` with
S = sum F_e) and split per expert with one ``split`` per forward; each expert runs on its contiguous slice.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..balance.losses import size_penalty_loss  # noqa: F401  (re-exported; the loss lives in moekit.balance)
from ..balance.specs import SizePenalty, _sizes  # noqa: F401
from ..spec import Spec, register_spec
from .activations import ACTIVATIONS


@register_spec("hetero", "experts")
@dataclasses.dataclass(frozen=True, kw_only=True)
class HeteroFFN(Spec):
    """Experts with per-expert hidden sizes (HMoE).

    Args:
        hidden_dims: F_e for each expert, in expert order; its length must equal the layer's ``num_experts``.
        activation: a name from ``moekit.experts.ACTIVATIONS``.
        glu: gated linear unit (SwiGLU when activation is silu).
        bias: biases on every projection.
    """

    hidden_dims: tuple[int, ...]
    activation: str = "silu"
    glu: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", _sizes("HeteroFFN", self.hidden_dims))
        ACTIVATIONS.get(self.activation)

    def pair_flops_E(self, dim: int, num_experts: int) -> Tensor:
        """Forward FLOPs of one (token, expert) pair per expert: 2 (3 if glu else 2) D F_e."""
        return 2.0 * (3 if self.glu else 2) * dim * torch.as_tensor(self.hidden_dims, dtype=torch.float64)

    def build(self, dim: int, num_experts: int) -> "HeteroExpertBank":
        if len(self.hidden_dims) != num_experts:
            raise ValueError(
                f"HeteroFFN: {len(self.hidden_dims)} hidden_dims given for {num_experts} experts; give one per expert"
            )
        return HeteroExpertBank(dim, self)


class HeteroExpertBank(nn.Module):
    """``forward(x_ND, counts_E, expert_N) -> y_ND`` with rows grouped by expert, experts of different sizes."""

    def __init__(self, dim: int, spec: HeteroFFN) -> None:
        super().__init__()
        self.spec = spec
        self.dim, self.hidden_dims = dim, spec.hidden_dims
        self.num_experts = len(spec.hidden_dims)
        self.act = ACTIVATIONS.get(spec.activation)
        S = sum(spec.hidden_dims)
        self.w1_SD = nn.Parameter(torch.empty(S, dim))
        self.w3_SD = nn.Parameter(torch.empty(S, dim)) if spec.glu else None
        self.w2_DS = nn.Parameter(torch.empty(dim, S))
        self.b1_S = nn.Parameter(torch.zeros(S)) if spec.bias else None
        self.b3_S = nn.Parameter(torch.zeros(S)) if spec.bias and spec.glu else None
        self.b2_ED = nn.Parameter(torch.zeros(self.num_experts, dim)) if spec.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.w1_SD, -bound, bound)
        if self.w3_SD is not None:
            nn.init.uniform_(self.w3_SD, -bound, bound)
        with torch.no_grad():  # w2 of expert e is initialised with its own fan-in F_e
            for w2, f in zip(self.w2_DS.split(self.hidden_dims, 1), self.hidden_dims):
                w2.uniform_(-1.0 / math.sqrt(f), 1.0 / math.sqrt(f))

    def _split(self, t: Tensor | None, dim: int = 0) -> list:
        return [None] * self.num_experts if t is None else list(t.split(self.hidden_dims, dim))

    def forward(self, x_ND: Tensor, counts_E: Tensor, expert_N: Tensor | None = None) -> Tensor:
        counts = counts_E.tolist()
        w1, w3, w2 = self._split(self.w1_SD), self._split(self.w3_SD), self._split(self.w2_DS, 1)
        b1, b3 = self._split(self.b1_S), self._split(self.b3_S)
        b2 = [None] * self.num_experts if self.b2_ED is None else list(self.b2_ED.unbind(0))
        outs = []
        for e, x_e in enumerate(x_ND.split(counts)):
            if counts[e] == 0:
                continue
            h = self.act(F.linear(x_e, w1[e], b1[e]))
            if w3[e] is not None:
                h = h * F.linear(x_e, w3[e], b3[e])
            outs.append(F.linear(h, w2[e], b2[e]))
        if not outs:
            return x_ND.new_zeros(0, self.dim) + 0 * self.w2_DS.sum()
        return torch.cat(outs)

    def expert_forward(self, e: int, x_TD: Tensor) -> Tensor:
        w1, w3, w2 = self._split(self.w1_SD)[e], self._split(self.w3_SD)[e], self._split(self.w2_DS, 1)[e]
        b1, b3 = self._split(self.b1_S)[e], self._split(self.b3_S)[e]
        h = self.act(F.linear(x_TD, w1, b1))
        if w3 is not None:
            h = h * F.linear(x_TD, w3, b3)
        return F.linear(h, w2, None if self.b2_ED is None else self.b2_ED[e])

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.dim}, F={list(self.hidden_dims)}, act={self.spec.activation}"
