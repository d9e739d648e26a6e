"""Balance losses as pure functions of an Assignment. No state, no globals.

Every loss reads ``a.counts_E()`` (the dispatch plan's counts when the layer filled ``Assignment.routed_E``, so
nothing is recounted) and skips padded tokens when ``a.token_mask_T`` is set: a masked loss equals the loss on the
real tokens alone.

The f·P family (Switch, MoE++'s heterogeneous loss, HMoE's size penalty, and the global-batch variant in
``moekit.parallel.balance``) shares :func:`f_dot_p`: ``scale * sum_e eta_e f_e P_e``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..assignment import Assignment
from ..numerics import at_least_fp32


def router_probs_TE(a: Assignment, normalize: bool = True) -> Tensor:
    """The router scores of the real tokens; with ``normalize`` each row is divided by its sum (sigmoid scores do
    not sum to one; DeepSeek-V3's sequence-wise loss normalises the same way)."""
    if a.scores_TE is None:
        raise ValueError("this balance loss needs router scores; the router returned an Assignment without scores_TE")
    s = a.real_rows(a.scores_TE)
    return s / s.sum(-1, keepdim=True).clamp_min(1e-20) if normalize else s


_probs_TE = router_probs_TE  # the name moekit.parallel.balance imports


def _mean(x: Tensor, dim: int | None = None) -> Tensor:
    """``x.mean(dim)``, but zero (not NaN) over zero rows: a batch of no tokens has zero balance loss."""
    if x.shape[0] == 0:
        return x.sum() if dim is None else x.sum(dim)
    return x.mean() if dim is None else x.mean(dim)


def f_dot_p(f_E: Tensor, P_E: Tensor, eta_E: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``scale * sum_e (f_e eta_e) P_e``: the shared core of every f·P balance loss. ``f_E`` is a load fraction
    (no gradient), ``P_E`` a mean router probability; ``eta_E`` an optional per-expert weight."""
    fe_E = f_E if eta_E is None else f_E * eta_E
    s = (fe_E * P_E).sum()
    return s if scale == 1.0 else scale * s


def load_fraction_E(a: Assignment, dtype: torch.dtype, per: str = "pairs") -> Tensor:
    """f_e: the fraction of routed pairs (``per="pairs"``) or of tokens (``per="tokens"``) that chose e, over the
    real tokens, counted before capacity dropping."""
    denom = a.num_real_pairs if per == "pairs" else a.num_real_tokens
    return a.counts_E().to(dtype) / max(denom, 1)


def switch_loss(a: Assignment) -> Tensor:
    """Switch / GShard load-balancing loss, E * sum_e f_e * P_e, with f_e the fraction of routed pairs that go to
    expert e (counted before capacity dropping) and P_e the mean router probability of e. Equals 1 when balanced
    (HF Mixtral's ``load_balancing_loss_func`` gives k times this value for top-k)."""
    P_E = _mean(router_probs_TE(a), 0)
    f_E = load_fraction_E(a, a.scores_TE.dtype)
    return f_dot_p(f_E, P_E, scale=a.num_experts)


def hetero_balance_loss(a: Assignment, tau: float) -> Tensor:
    """MoE++'s heterogeneous load-balancing loss, sum_i eta_i f_i P_i over all experts (FFN and
    zero-computation), eta_i = 1 for FFN experts and ``tau`` for the ``a.num_free_experts`` zero-computation ones;
    f_i = (tokens that selected i) / T, P_i = mean_t p_{t,i} (unnormalised softmax scores)."""
    if a.scores_TE is None:
        raise ValueError("the heterogeneous balance loss needs router scores (Assignment.scores_TE)")
    P_E = _mean(router_probs_TE(a, normalize=False), 0)
    f_E = load_fraction_E(a, P_E.dtype, per="tokens")
    eta_E = torch.ones_like(P_E)
    eta_E[a.num_bank_experts :] = tau
    return f_dot_p(f_E, P_E, eta_E)


def size_penalty_loss(a: Assignment, hidden_dims) -> Tensor:
    """HMoE's P-Penalty, E * sum_e (f_e F_e / mean F) P_e (f over routed pairs, P the mean router probability)."""
    if a.scores_TE is None:
        raise ValueError("the size penalty needs router scores (Assignment.scores_TE)")
    if len(hidden_dims) != a.num_experts:
        raise ValueError(f"SizePenalty: {len(hidden_dims)} hidden_dims for {a.num_experts} routed experts")
    P_E = _mean(router_probs_TE(a), 0)
    size_E = torch.tensor(hidden_dims, dtype=P_E.dtype, device=P_E.device)
    f_E = load_fraction_E(a, P_E.dtype)
    return f_dot_p(f_E, P_E, size_E / size_E.mean(), scale=a.num_experts)


def z_loss(a: Assignment) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
    if a.logits_TE is None:
        raise ValueError("z-loss needs router logits; the router returned an Assignment without logits_TE")
    return _mean(torch.logsumexp(at_least_fp32(a.real_rows(a.logits_TE)), -1).pow(2))


def router_entropy(a: Assignment) -> Tensor:
    """Mean over tokens of the router entropy -sum_e p_e log p_e (the top-p paper's dynamic loss L_d)."""
    if a.scores_TE is None:
        raise ValueError("the entropy loss needs router scores; the router returned an Assignment without scores_TE")
    return _mean(torch.special.entr(at_least_fp32(a.real_rows(a.scores_TE))).sum(-1))


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation, Var(v) / (mean(v)^2 + 1e-10) (Shazeer et al. 2017)."""
    if v.numel() <= 1:
        return v.new_zeros(())
    v = at_least_fp32(v)
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


def cv2_loss(a: Assignment) -> Tensor:
    """CV^2(importance) + CV^2(load) (Shazeer et al. 2017; M3ViT). Importance is the sum of each expert's combine
    weights; load is the hard pair count, which carries no gradient."""
    expert_N, weight_N = a.expert_N, a.weight_N
    keep_N = a.pair_mask_N()
    if keep_N is not None:
        expert_N, weight_N = expert_N[keep_N], weight_N[keep_N]
    importance_E = torch.zeros(a.num_experts, dtype=weight_N.dtype, device=weight_N.device)
    importance_E = importance_E.index_add(0, expert_N, weight_N)
    load_E = a.counts_E().to(importance_E.dtype)
    return cv_squared(importance_E) + cv_squared(load_E)
