"""Activation registry shared by expert banks and dense FFNs."""

from __future__ import annotations

import torch.nn.functional as F

from ..registry import Registry

ACTIVATIONS: Registry = Registry("activation")
ACTIVATIONS.register("silu")(F.silu)
ACTIVATIONS.register("swish")(F.silu)
ACTIVATIONS.register("gelu")(F.gelu)
ACTIVATIONS.register("gelu_tanh")(lambda x: F.gelu(x, approximate="tanh"))
ACTIVATIONS.register("relu")(F.relu)

from ..approx.gelu import gelu_table  # noqa: E402  (Edge-MoE's table GELU; torch-only module)

ACTIVATIONS.register("gelu_table")(gelu_table)
