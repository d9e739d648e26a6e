"""Conversions between moekit layers and other libraries' MoE blocks (transformers is imported lazily)."""

from .hf import (
    SUPPORTED_BLOCKS, HFBlockAdapter, SwapHandle, from_hf, is_hf_moe_block, revert_hf_moe, swap_hf_moe, to_hf,
)

__all__ = [
    "SUPPORTED_BLOCKS", "HFBlockAdapter", "SwapHandle", "from_hf", "is_hf_moe_block", "revert_hf_moe", "swap_hf_moe",
    "to_hf",
]

# moekit as a transformers experts implementation (experts_implementation="moekit"); registers when transformers'
# MoE integration is imported, without importing transformers here (docs/hf_architectures.md)
from .hf_experts import moekit_experts_forward, register_hf, register_when_imported  # noqa: E402

register_when_imported()
__all__ += ["moekit_experts_forward", "register_hf"]
