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


class UnitGateRouter(nn.Module):
    def __init__(self, inner: nn.Module, spec: UnitGate) -> None:
        super().__init__()
        self.inner = inner
        self.spec = spec

    @property
    def bias_E(self) -> Tensor | None:  # the selection bias of the wrapped router (auxiliary-loss-free balancing)
        return getattr(self.inner, "bias_E", None)

    def forward(self, x_TD: Tensor, task: Tensor | None = None, **kwargs: Any) -> Assignment:
        a = self.inner(x_TD, task=task, **kwargs)
        w_N = a.weight_N
        return dataclasses.replace(a, weight_N=1.0 + (w_N - w_N.detach()))

    def free_experts(self, *args: Any) -> Tensor:  # compute-free experts of the wrapped router, if it has them
        return self.inner.free_experts(*args)


def unwrap_router_spec(spec: Spec) -> Spec:
    """The selecting router inside any number of ``UnitGate`` wrappers."""
    while isinstance(spec, UnitGate):
        spec = spec.router
    return spec
