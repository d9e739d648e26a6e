"""Expert weight banks and dense FFNs."""

from .activations import ACTIVATIONS
from .bank import FFN, MLP, DenseFFN, ExpertBank, SwiGLU

__all__ = ["ACTIVATIONS", "FFN", "MLP", "DenseFFN", "ExpertBank", "SwiGLU"]

from .aoe import AoEExperts
from .clamped import ClampedSwiGLU
from .hetero import HeteroFFN, SizePenalty
from .zero_compute import ZeroComputeExperts

__all__ += ["AoEExperts", "ClampedSwiGLU", "HeteroFFN", "SizePenalty", "ZeroComputeExperts"]
