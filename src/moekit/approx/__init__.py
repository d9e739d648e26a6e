"""Edge-MoE's hardware-friendly approximations (Sarkar et al. 2023): a single-pass (online) softmax and a
table-based GELU. Both are exact-ish drop-ins with a measured error (see ``tests/test_vit_approx.py``)."""

from .gelu import GELU_TABLE_END, GELU_TABLE_STEP, gelu_table
from .softmax import SOFTMAX_MODES, online_softmax, online_softmax_stats, softmax

__all__ = [
    "GELU_TABLE_END", "GELU_TABLE_STEP", "SOFTMAX_MODES", "gelu_table", "online_softmax", "online_softmax_stats",
    "softmax",
]
