"""Conversions between moekit layers and other libraries' MoE blocks (transformers is imported lazily)."""

from .hf import (
    SUPPORTED_BLOCKS, HFBlockAdapter, SwapHandle, from_hf, is_hf_moe_block, revert_hf_moe, swap_hf_moe, to_hf,
)

__all__ = [
    "SUPPORTED_BLOCKS", "HFBlockAdapter", "SwapHandle", "from_hf", "is_hf_moe_block", "revert_hf_moe", "swap_hf_moe",
    "to_hf",
]
