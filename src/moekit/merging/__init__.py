"""Merging experts' parameters instead of routing tokens: SMEAR and its baselines (tag, top-1, ST-Gumbel,
REINFORCE, ensemble)."""

from .router import ExampleRouter, mean_pool
from .smear import ROUTINGS, SMEAR, SMEARConfig, SMEARRouting, reinforce_loss, set_step

__all__ = ["ROUTINGS", "SMEAR", "ExampleRouter", "SMEARConfig", "SMEARRouting", "mean_pool", "reinforce_loss", "set_step"]
