"""The router contract.

A router is an ``nn.Module`` called as ``router(x_TD, task=None) -> Assignment``. Its spec is a frozen dataclass
with ``build(dim, num_experts) -> nn.Module``. Routers may own a ``bias_E`` buffer used *only for selection*
(auxiliary-loss-free balancing); the balance policy updates it outside forward.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..spec import Spec


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterSpec(Spec):
    def build(self, dim: int, num_experts: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, num_experts: int) -> None:
        """Raise a ValueError if this spec cannot route over ``num_experts`` experts."""
