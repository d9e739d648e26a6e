"""Serve MoE checkpoints whose experts do not fit in memory: experts stay in safetensors files and are read when
routed, through a byte-bounded cache with pluggable eviction, optional next-layer prefetch and optional int8/int4
compression; plus calibration-based expert pruning and merging that write a smaller checkpoint.

Needs transformers (and accelerate for meta-device construction); ``import moekit`` does not import this package.
"""

from .budget import parse_budget
from .cache import CacheStats, ExpertCache, ExpertWeights
from .layout import ExpertSource, find_source
from .loader import OffloadedModel, find_experts_modules, load_offloaded
from .policies import LFU, LRU, POLICIES, ActivationAware, make_policy
from .prefetch import Prefetcher, PrefetchStats
from .pregate import prediction_quality, train_pregate
from .quant import QuantizedTensor, quantize
from .reader import CheckpointError, CheckpointIndex
from .runtime import OffloadRuntime, QuantConfig

__all__ = ["ActivationAware", "CacheStats", "CheckpointError", "CheckpointIndex", "ExpertCache", "ExpertSource",
           "ExpertWeights", "LFU", "LRU", "OffloadRuntime", "OffloadedModel", "POLICIES", "Prefetcher",
           "PrefetchStats", "QuantConfig", "QuantizedTensor", "find_experts_modules", "find_source",
           "load_offloaded", "make_policy", "parse_budget", "prediction_quality", "quantize", "train_pregate"]
