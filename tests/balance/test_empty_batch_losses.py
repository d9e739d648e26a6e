"""Zero tokens give a zero-token output and zero (finite) balance losses, for every loss that reads router scores or
logits, and gradients still flow (issue 15, item 5)."""

import pytest
import torch

from moekit import MoE, SwitchLoss, TopK
from moekit.balance import CV2Loss, EntropyLoss, ZLoss


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_empty_batch_losses_are_zero(shape):
    m = MoE(8, 4, router=TopK(k=2), balance=(SwitchLoss(coef=0.01), ZLoss(coef=1e-3), CV2Loss(coef=0.01),
                                             EntropyLoss(coef=1e-4)))
    x = torch.randn(*shape, requires_grad=True)
    out = m.forward_with_aux(x)
    assert out.y.shape == x.shape
    assert set(out.losses) == {"switch", "z", "cv2", "entropy"}
    for name, value in out.losses.items():
        assert torch.isfinite(value) and float(value.detach()) == 0.0, (name, value)
    (out.y.sum() + out.aux_loss).backward()
    assert m.router.gate.weight.grad is None or torch.all(m.router.gate.weight.grad == 0)


def test_nonempty_losses_unchanged_by_the_empty_guard():
    torch.manual_seed(0)
    m = MoE(8, 4, router=TopK(k=2), balance=(SwitchLoss(coef=1.0), ZLoss(coef=1.0)))
    x = torch.randn(5, 8, dtype=torch.float64)
    m = m.double()
    out = m.forward_with_aux(x)
    a = out.assignment
    P_E = a.scores_TE.mean(0)
    f_E = torch.bincount(a.expert_N, minlength=4).double() / a.expert_N.numel()
    assert torch.allclose(out.losses["switch"], 4 * (f_E * P_E).sum(), atol=1e-12)
    assert torch.allclose(out.losses["z"], torch.logsumexp(a.logits_TE, -1).pow(2).mean(), atol=1e-12)
