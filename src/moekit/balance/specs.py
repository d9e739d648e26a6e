"""Balance losses with their coefficients: ``spec.loss(a)`` returns the weighted loss of an Assignment.

Every auxiliary loss of moekit lives here (Switch, z, CV^2, MoE++'s heterogeneous loss, the top-p entropy loss,
HMoE's size penalty); auxiliary-loss-free balancing is not a loss and lives in :mod:`moekit.balance.aux_free`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import Tensor

from ..assignment import Assignment
from ..spec import Spec, register_spec
from . import losses


@dataclasses.dataclass(frozen=True, kw_only=True)
class BalanceSpec(Spec):
    """An auxiliary balance loss: ``loss(a)`` is ``coef`` times a pure function of the Assignment."""

    nonnegative_fields: ClassVar[tuple[str, ...]] = ("coef",)
    coef: float = 0.0

    def loss(self, a: Assignment) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


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


@register_spec("hetero_balance", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class HeteroBalanceLoss(BalanceSpec):
    """MoE++ heterogeneous load balance, ``coef * sum_i eta_i f_i P_i`` (eta = 1 FFN, tau zero-computation).
    Defaults coef 0.01, tau 0.75 (recalled from the paper)."""

    coef: float = 0.01
    tau: float = 0.75

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"HeteroBalanceLoss: tau must be > 0, got {self.tau}")

    def loss(self, a: Assignment) -> Tensor:
        return self.coef * losses.hetero_balance_loss(a, self.tau)


@register_spec("entropy", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class EntropyLoss(BalanceSpec):
    """Router-entropy loss ``coef * mean_t(-sum_e p log p)`` (Huang et al. 2024's dynamic loss; HMoE also uses it
    with top-p). Default coef 1e-4, the top-p paper's weight."""

    coef: float = 1e-4

    def loss(self, a: Assignment) -> Tensor:
        return self.coef * losses.router_entropy(a)


def _sizes(name: str, hidden_dims) -> tuple[int, ...]:
    dims = tuple(hidden_dims) if not isinstance(hidden_dims, (str, bytes)) else ()
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{name}: hidden_dims must be a non-empty sequence of positive sizes (ints), got {hidden_dims!r}")
    return dims


@register_spec("size_penalty", "balance")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SizePenalty(BalanceSpec):
    """HMoE's parameter penalty ``coef * E * sum_e f_e (F_e / mean F) P_e``; pass the same ``hidden_dims`` as the
    layer's :class:`moekit.HeteroFFN`. Default coef 0.01."""

    hidden_dims: tuple[int, ...]
    coef: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", _sizes("SizePenalty", self.hidden_dims))

    def loss(self, a: Assignment) -> Tensor:
        return self.coef * losses.size_penalty_loss(a, self.hidden_dims)

from .aux_free import AuxFree, bias_step  # noqa: E402,F401  (their old home)
