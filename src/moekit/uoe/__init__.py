"""Union of Experts (Yang et al. 2025): a dense model decomposed into experts (MLP slices, attention heads),
selective multi-head attention and token-selection routing for the MLP slices."""

from .attention import HeadExperts
from .mlp import SlicedMLP, TokenSelection

__all__ = ["HeadExperts", "SlicedMLP", "TokenSelection"]
