"""Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): a selection bias moved between steps, not a loss.

:class:`AuxFree` is the spec; :class:`AuxFreeBalancer` is the layer's buffer module that holds the policy's state
(the pending expert counts since the last update, and the rate). The bias itself, ``router.bias_E``, belongs to the
router because it is part of the routing function (DeepSeek-V3 checkpoints ship it as ``e_score_correction_bias``);
the balancer only moves it, in :meth:`AuxFreeBalancer.step`, never inside forward.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..spec import Spec, register_spec


@register_spec("aux_free", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AuxFree(Spec):
    """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): a per-expert bias added to the scores for
    selection only, moved by ``rate * sign(mean_load - load_e)`` after each optimizer step. The update runs only
    when you call :func:`moekit.update_balance_bias` (or the hook from :func:`moekit.attach_bias_update`), never
    inside forward. Default rate 1e-3 (DeepSeek-V3's gamma)."""

    legacy_fields: ClassVar[tuple[str, ...]] = ("coef",)  # older configs stored an unused ``coef``
    rate: float = 1e-3

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"AuxFree: rate must be > 0, got {self.rate}")

    def build(self, num_experts: int) -> "AuxFreeBalancer":
        return AuxFreeBalancer(num_experts, self.rate)


def bias_step(bias_E: Tensor, counts_E: Tensor, rate: float) -> None:
    """In place: raise the bias of under-loaded experts and lower it for over-loaded ones."""
    load = counts_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load.mean() - load))


class AuxFreeBalancer(nn.Module):
    """The state of the aux-free policy: ``pending_counts_E`` (a non-persistent buffer) accumulates the routed load
    of training forwards (:meth:`record`); :meth:`step` moves a bias by it and clears it."""

    def __init__(self, num_experts: int, rate: float) -> None:
        super().__init__()
        self.rate = rate
        self.register_buffer("pending_counts_E", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def record(self, counts_E: Tensor) -> None:
        self.pending_counts_E += counts_E.to(self.pending_counts_E.device)

    @torch.no_grad()
    def step(self, bias_E: Tensor) -> None:
        if int(self.pending_counts_E.sum()) == 0:
            return
        bias_step(bias_E, self.pending_counts_E, self.rate)
        self.pending_counts_E.zero_()

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
