"""An empty batch (T = 0) gives a zero-token output, zero losses and empty gradients (issue 15, item 5)."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.balance import CV2Loss
from moekit.dispatch.local import Capacity, Dropless
from moekit.experts import MLP, SwiGLU


@pytest.mark.parametrize("dispatch", [Dropless(), Capacity(), Capacity(factor=1.0, per_sequence=True)],
                         ids=["dropless", "capacity", "capacity-per-seq"])
@pytest.mark.parametrize("experts", [SwiGLU(hidden_dim=16), MLP(hidden_dim=16)], ids=["swiglu", "mlp"])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_empty_batch(dispatch, experts, shape):
    layer = MoE(8, 4, dispatch=dispatch, experts=experts, shared_experts=SwiGLU(hidden_dim=4),
                balance=(CV2Loss(coef=0.01),))  # SwitchLoss / ZLoss over 0 tokens: the balance losses' owner
    x = torch.randn(*shape, requires_grad=True)
    out = layer.forward_with_aux(x)
    assert out.y.shape == shape
    assert float(out.aux_loss.detach()) == 0.0, out.losses
    assert all(float(v.detach()) == 0.0 for v in out.losses.values()), out.losses
    (out.y.sum() + out.aux_loss).backward()
    assert x.grad.shape == shape
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())
    assert int(out.stats.routed_per_expert_E.sum()) == 0
