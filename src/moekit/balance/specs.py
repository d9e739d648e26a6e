"""Balance policies: auxiliary losses with their coefficients, and auxiliary-loss-free bias balancing."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..assignment import Assignment
from ..spec import Spec, register_spec
from . import losses


@dataclasses.dataclass(frozen=True, kw_only=True)
class BalanceSpec(Spec):
    coef: float = 0.0

    def loss(self, a: Assignment) -> Tensor | None:
        return None


@register_spec("switch", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SwitchLoss(BalanceSpec):
    """Switch/GShard load-balancing loss (Fedus et al. 2021), ``coef * E * sum f_e P_e``. Default coef 0.01."""

    coef: float = 0.01

    def loss(self, a: Assignment) -> Tensor:
        return self.coef * losses.switch_loss(a)


@register_spec("z", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ZLoss(BalanceSpec):
    """Router z-loss (Zoph et al. 2022, ST-MoE). Default coef 1e-3."""

    coef: float = 1e-3

    def loss(self, a: Assignment) -> Tensor:
        return self.coef * losses.z_loss(a)


@register_spec("cv2", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CV2Loss(BalanceSpec):
    """CV^2 importance + load loss (Shazeer et al. 2017, M3ViT). Default coef 0.01."""

    coef: float = 0.01

    def loss(self, a: Assignment) -> Tensor:
        return self.coef * losses.cv2_loss(a)


@register_spec("aux_free", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AuxFree(BalanceSpec):
    """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): a per-expert bias added to the scores for
    selection only, moved by ``rate * sign(mean_load - load_e)`` after each optimizer step. The update runs only
    when you call :func:`moekit.update_balance_bias` (or the hook from :func:`moekit.attach_bias_update`), never
    inside forward. Default rate 1e-3 (DeepSeek-V3's gamma)."""

    rate: float = 1e-3

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"AuxFree: rate must be > 0, got {self.rate}")


def bias_step(bias_E: Tensor, counts_E: Tensor, rate: float) -> None:
    """In place: raise the bias of under-loaded experts and lower it for over-loaded ones."""
    load = counts_E.to(bias_E.dtype)
    bias_E.add_(rate * torch.sign(load.mean() - load))
