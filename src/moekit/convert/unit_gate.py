"""``UnitGate``: combine weights that are exactly 1 in the forward pass, with the wrapped router's gradient.

Upcycling needs it: a token sent to k experts that each hold a *slice* of the dense FFN (the neuron split) must add
the slices up with weight 1 to give the dense output back, and a Switch (top-1) layer whose experts are copies of the
dense FFN gives the dense output only if its single weight is 1. A plain softmax weight ``p`` scales the output down;
a renormalised top-1 weight ``p / p`` is 1 but carries no gradient, so the router would never learn.

``UnitGate`` uses the straight-through form ``w' = 1 + w - sg(w)`` (``sg`` = stop-gradient): the value is exactly
1 and ``d w' / d w = 1``, so the router receives the same gradient as with the weight ``w`` (for Switch,
``<dL/dy, E_e(x)>``). Selection is untouched: the wrapped router still picks the experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from ..assignment import Assignment
from ..protocols import RouteContext
from ..routers.base import RouterSpec
from ..spec import Spec, register_spec, spec_from_dict


@register_spec("unit_gate", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class UnitGate(RouterSpec):
    """Wrap a router spec so that each selected expert's combine weight is 1 (straight-through gradient).

    Args:
        router: the router that selects the experts, e.g. ``TopK(k=1)``; also given as a spec dict.
    """

    router: Any

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            object.__setattr__(self, "router", spec_from_dict("router", self.router))
        if not isinstance(self.router, RouterSpec):
            raise TypeError(f"UnitGate: router must be a router spec (e.g. TopK(k=1)), got {type(self.router).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "router": self.router.to_dict()}

    def validate(self, num_experts: int) -> None:
        self.router.validate(num_experts)

    def build(self, dim: int, num_experts: int) -> UnitGateRouter:
        return UnitGateRouter(self.router.build(dim, num_experts), self)

    # --- the wrapped router's declarations, passed through (UnitGate changes the weights only) -----------------
    @property
    def task_conditioned(self) -> bool:
        return self.router.task_conditioned

    @property
    def needs_token_ids(self) -> bool:
        return self.router.needs_token_ids

    @property
    def needs_prev_logits(self) -> bool:
        return self.router.needs_prev_logits

    @property
    def reads_experts(self) -> bool:
        return self.router.reads_experts

    @property
    def has_selection_bias(self) -> bool:
        return self.router.has_selection_bias

    @property
    def num_free_experts(self) -> int:
        return self.router.num_free_experts

    @property
    def supports_replay(self) -> bool:
        return self.router.supports_replay

    @property
    def consistency_passes(self) -> int:
        return self.router.consistency_passes

    def build_free_experts(self, dim: int) -> nn.Module | None:
        return self.router.build_free_experts(dim)

    def flops_per_token(self, dim: int, num_experts: int, *, experts: Spec | None = None,
                        task: int | None = None) -> float:
        return self.router.flops_per_token(dim, num_experts, experts=experts, task=task)

    def with_selection_bias(self) -> "UnitGate":
        return self._rewrap(self.router.with_selection_bias())

    def for_step_budget(self, steps: int) -> "UnitGate":
        return self._rewrap(self.router.for_step_budget(steps))

    def at_layer(self, index: int) -> "UnitGate":
        return self._rewrap(self.router.at_layer(index))

    def _rewrap(self, router: RouterSpec) -> "UnitGate":
        return self if router is self.router else dataclasses.replace(self, router=router)


class UnitGateRouter(nn.Module):
    """The wrapped router's assignment with every combine weight replaced by ``1 + w - sg(w)``."""

    def __init__(self, inner: nn.Module, spec: UnitGate) -> None:
        super().__init__()
        self.inner = inner
        self.spec = spec
        self.num_experts = inner.num_experts

    @property
    def bias_E(self) -> Tensor | None:  # the wrapped router's selection bias (auxiliary-loss-free balancing)
        return self.inner.bias_E

    def bind_experts(self, bank: nn.Module) -> None:  # called by the layer when the spec declares reads_experts
        self.inner.bind_experts(bank)

    def forward(self, x_TD: Tensor, ctx: RouteContext | None = None, **kwargs: Any) -> Assignment:
        a = self.inner(x_TD, ctx, **kwargs)
        w_N = a.weight_N
        return dataclasses.replace(a, weight_N=1.0 + (w_N - w_N.detach()))


def unwrap_router_spec(spec: Spec) -> Spec:
    """The selecting router inside any number of ``UnitGate`` wrappers."""
    while isinstance(spec, UnitGate):
        spec = spec.router
    return spec
