"""Expert weight banks and dense FFNs."""

from .activations import ACTIVATIONS
from .bank import FFN, MLP, DenseFFN, ExpertBank, SwiGLU

__all__ = ["ACTIVATIONS", "FFN", "MLP", "DenseFFN", "ExpertBank", "SwiGLU"]
