"""Balance losses as pure functions of an Assignment (and the dispatch counts). No state, no globals."""

from __future__ import annotations

import torch
from torch import Tensor

from ..assignment import Assignment


def _probs_TE(a: Assignment) -> Tensor:
    if a.scores_TE is None:
        raise ValueError("this balance loss needs router scores; the router returned an Assignment without scores_TE")
    s = a.scores_TE
    # sigmoid scores do not sum to one: normalise per token (DeepSeek-V3's sequence-wise loss does the same)
    return s / s.sum(-1, keepdim=True).clamp_min(1e-20)


def switch_loss(a: Assignment) -> Tensor:
    """Switch / GShard load-balancing loss, E * sum_e f_e * P_e, with f_e the fraction of routed pairs that go to
    expert e (counted before capacity dropping) and P_e the mean router probability of e. Equals 1 when balanced
    (HF Mixtral's ``load_balancing_loss_func`` gives k times this value for top-k)."""
    E = a.num_experts
    f_E = a.counts_E().to(a.scores_TE.dtype if a.scores_TE is not None else torch.float32) / max(a.num_pairs, 1)
    P_E = _probs_TE(a).mean(0)
    return E * (f_E * P_E).sum()


def z_loss(a: Assignment) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
    if a.logits_TE is None:
        raise ValueError("z-loss needs router logits; the router returned an Assignment without logits_TE")
    return torch.logsumexp(a.logits_TE.float() if a.logits_TE.dtype in (torch.float16, torch.bfloat16) else a.logits_TE, -1).pow(2).mean()


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation, Var(v) / (mean(v)^2 + 1e-10) (Shazeer et al. 2017)."""
    if v.numel() <= 1:
        return v.new_zeros(())
    v = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


def cv2_loss(a: Assignment) -> Tensor:
    """CV^2(importance) + CV^2(load) (Shazeer et al. 2017; M3ViT). Importance is the sum of each expert's combine
    weights; load is the hard pair count, which carries no gradient."""
    importance_E = torch.zeros(a.num_experts, dtype=a.weight_N.dtype, device=a.weight_N.device)
    importance_E = importance_E.index_add(0, a.expert_N, a.weight_N)
    load_E = a.counts_E().to(importance_E.dtype)
    return cv_squared(importance_E) + cv_squared(load_E)
