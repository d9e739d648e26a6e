"""Routers: ``router(x_TD, task=None) -> Assignment``."""

from .base import RouterSpec
from .topk import TopK, TopKRouter

__all__ = ["RouterSpec", "TopK", "TopKRouter"]
