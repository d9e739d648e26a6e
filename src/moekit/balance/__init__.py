"""Balance: pure loss functions of an Assignment and the auxiliary-loss-free bias policy."""

from .losses import cv2_loss, cv_squared, switch_loss, z_loss
from .specs import AuxFree, BalanceSpec, CV2Loss, SwitchLoss, ZLoss, bias_step

__all__ = [
    "AuxFree", "BalanceSpec", "CV2Loss", "SwitchLoss", "ZLoss",
    "bias_step", "cv2_loss", "cv_squared", "switch_loss", "z_loss",
]
