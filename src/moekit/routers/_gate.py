"""A linear routing map with the routers' precision policy: half-precision inputs are routed in float32."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..numerics import HALF_DTYPES


def linear_logits(gate: nn.Linear, x_TD: Tensor, fp32: bool = True) -> Tensor:
    """``x_TD @ gate.weight.T (+ bias)``, computed in float32 when ``fp32`` and the input is float16/bfloat16."""
    if fp32 and x_TD.dtype in HALF_DTYPES:
        bias = None if gate.bias is None else gate.bias.float()
        return F.linear(x_TD.float(), gate.weight.float(), bias)
    return gate(x_TD)
