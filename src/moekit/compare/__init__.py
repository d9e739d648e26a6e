"""``moekit compare``: train one small model with several routers for the same step budget and tabulate quality,
active FLOPs, experts per token, load balance and wall time. See ``docs/compare.md``."""

from .presets import DIGITS_PRESETS, LM_PRESETS, DigitsPreset, LMPreset, lm_choices
from .runner import DigitsConfig, LMConfig, RunResult, train_digits, train_lm

__all__ = [
           "DIGITS_PRESETS",
           "LM_PRESETS",
           "DigitsConfig",
           "DigitsPreset",
           "LMConfig",
           "LMPreset",
           "RunResult",
           "lm_choices",
           "train_digits",
           "train_lm",
]
