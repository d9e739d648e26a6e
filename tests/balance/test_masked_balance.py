"""Padding-aware balance: with a token mask, every balance loss, the statistics and the aux-free counts equal those
of a call on the real tokens alone (float64, <= 1e-12)."""

from __future__ import annotations

import pytest
import torch

from moekit import (AuxFree, CV2Loss, EntropyLoss, HeteroBalanceLoss, HeteroFFN, MoE, MoEPP, SizePenalty,
                    SwiGLU, SwitchLoss, TopK, TopP, ZLoss)

D, E = 8, 4
CASES = {
    "topk": dict(router=TopK(k=2), balance=(SwitchLoss(), ZLoss(), CV2Loss())),
    "sigmoid": dict(router=TopK(k=2, score="sigmoid"), balance=(SwitchLoss(), ZLoss())),
    "top_p": dict(router=TopP(threshold=0.5), balance=(SwitchLoss(), EntropyLoss())),
    "moepp": dict(router=MoEPP(k=2), balance=(HeteroBalanceLoss(), SwitchLoss())),
    "hmoe": dict(router=TopK(k=2), experts=HeteroFFN(hidden_dims=(4, 8, 8, 12)),
                 balance=(SizePenalty(hidden_dims=(4, 8, 8, 12)), CV2Loss())),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_masked_losses_equal_losses_on_real_tokens(name):
    kw = dict(CASES[name])
    kw.setdefault("experts", SwiGLU(hidden_dim=12))
    layer = MoE(D, E, **kw).double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = mask[2, 1:] = False
    masked = layer.forward_with_aux(x, token_mask=mask)
    alone = layer.forward_with_aux(x[mask])
    assert masked.losses.keys() == alone.losses.keys() and masked.losses
    for k in masked.losses:
        assert abs(float((masked.losses[k] - alone.losses[k]).detach())) <= 1e-12, k
    # gradients of the masked aux loss equal those on the real tokens alone
    g_masked = torch.autograd.grad(masked.aux_loss, list(layer.router.parameters()), allow_unused=True)
    g_alone = torch.autograd.grad(alone.aux_loss, list(layer.router.parameters()), allow_unused=True)
    for a, b in zip(g_masked, g_alone):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() <= 1e-12)
    s_m, s_a = masked.stats, alone.stats
    assert s_m.num_tokens == s_a.num_tokens == int(mask.sum())
    assert torch.equal(s_m.routed_per_expert_E, s_a.routed_per_expert_E)
    assert torch.equal(s_m.tokens_per_expert_E, s_a.tokens_per_expert_E)
    # padding does not change the outputs at real tokens
    assert (masked.y[mask] - alone.y).abs().max() <= 1e-12
    # the mask changes the loss (the test can fail)
    unmasked = layer.forward_with_aux(x)
    assert any(abs(float((unmasked.losses[k] - alone.losses[k]).detach())) > 1e-9 for k in alone.losses)


def test_aux_free_counts_skip_padding():
    layer = MoE(D, E, router=TopK(k=2), balance=AuxFree()).double().train()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :2] = True
    layer(x, token_mask=mask)
    assert int(layer.pending_counts_E.sum()) == 2 * 2 * 2  # 4 real tokens x k=2


def test_bad_mask_shape():
    with pytest.raises(ValueError, match=r"token_mask must have the input's leading shape \(2, 3\)"):
        MoE(D, E)(torch.randn(2, 3, D), token_mask=torch.ones(6, dtype=torch.bool))
