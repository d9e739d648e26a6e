"""Balance: every auxiliary loss (pure functions of an Assignment, and their specs) and the auxiliary-loss-free bias
policy (not a loss)."""

from .aux_free import AuxFree, AuxFreeBalancer, bias_step
from .losses import (cv2_loss, cv_squared, f_dot_p, hetero_balance_loss, router_entropy, router_probs_TE,
                     size_penalty_loss, switch_loss, z_loss)
from .specs import BalanceSpec, CV2Loss, EntropyLoss, HeteroBalanceLoss, SizePenalty, SwitchLoss, ZLoss

__all__ = [
    "AuxFree", "AuxFreeBalancer", "BalanceSpec", "CV2Loss", "EntropyLoss", "HeteroBalanceLoss", "SizePenalty",
    "SwitchLoss", "ZLoss", "bias_step", "cv2_loss", "cv_squared", "f_dot_p", "hetero_balance_loss",
    "router_entropy", "router_probs_TE", "size_penalty_loss", "switch_loss", "z_loss",
]
