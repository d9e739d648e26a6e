"""Top-k of the logits, then a softmax over the k selected logits (OpenAI gpt-oss's router).

For token t with logits ``l = W x_t (+ b)``: ``idx = top-k(l + bias_E)`` (``bias_E`` only with a selection bias,
for auxiliary-loss-free balancing), ``w_j = exp(l_idx_j) / sum_i exp(l_idx_i)``. Mathematically that is
``TopK(normalize=True)``'s renormalised softmax, but computed over the k selected logits only, as gpt-oss does, so
it rounds as gpt-oss rounds in every dtype. ``scores_TE`` (for balance losses and statistics) is the softmax over all
experts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..assignment import Assignment
from ..numerics import as_dtype
from ..protocols import RouteContext
from ..spec import register_spec
from .topk import TopK, TopKRouter


@register_spec("topk_softmax", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKSoftmax(TopK):
    """gpt-oss routing: top-k of the (biased) linear logits, softmax over the selected k.

    Takes :class:`TopK`'s arguments; ``score`` must stay ``"softmax"``, ``normalize`` has no effect (the k weights
    already sum to one) and ``scale`` multiplies them. gpt-oss: ``router_bias=True``, ``fp32=False`` (the router
    runs in the input dtype).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score != "softmax":
            raise ValueError(f"TopKSoftmax: the weights are a softmax over the k selected logits; score must be "
                             f"'softmax', got {self.score!r}")

    def build(self, dim: int, num_experts: int) -> "TopKSoftmaxRouter":
        self.validate(num_experts)
        return TopKSoftmaxRouter(dim, num_experts, self)


class TopKSoftmaxRouter(TopKRouter):
    spec: TopKSoftmax

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        s = self.spec
        logits_TE = self.logits(x_TD)
        z_TE = logits_TE if s.score_dtype is None else logits_TE.to(getattr(torch, s.score_dtype))
        idx_TK, top_TK = self.top(z_TE, ctx, x_TD)
        weight_TK = top_TK.softmax(-1)
        if s.scale != 1.0:
            weight_TK = weight_TK * s.scale
        scores_TE = z_TE.softmax(-1)
        return Assignment.from_topk(idx_TK, as_dtype(weight_TK, x_TD.dtype), self.num_experts, scores_TE, logits_TE)
