"""The Assignment: the contract between routing and compute.

A router says *which* (token, expert) pairs exist and with what combine weight; it does not move data.
Pairs, not a fixed T x K grid, so that one format carries top-k token choice (N = T*K), expert choice,
variable-N routers and task routing. Pairs are listed in *priority order*: when a capacity dispatcher must
drop pairs, earlier pairs win (for top-k, all first choices come before all second choices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Assignment:
    token_N: Tensor  # long (N,): the token each pair reads
    expert_N: Tensor  # long (N,): the expert it goes to
    weight_N: Tensor  # (N,): combine weight, differentiable
    num_tokens: int
    num_experts: int
    scores_TE: Tensor | None = None  # router probabilities, for balance losses and statistics
    logits_TE: Tensor | None = None  # raw logits, for the z-loss
    # Compute-free experts (MoE++ zero/copy/constant, AdaMoE null): the last ``num_free_experts`` expert ids. Their
    # pairs never reach the expert bank; the layer hands them to its ``free_experts`` part (see :meth:`split_free`).
    num_free_experts: int = 0
    num_slots: int | None = None  # K when the pairs are exactly the (T, K) grid in slot-major order (pair = j*T + t)
    # Pairs per expert before dropping, over all ``num_experts``, when already counted (the layer fills it from the
    # dispatch plan so that balance losses do not recount); None: :meth:`counts_E` counts.
    routed_E: Tensor | None = None
    # bool (T,): False for padded tokens, which balance losses and statistics skip; None: every token is real.
    token_mask_T: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.token_N.numel())

    @property
    def num_bank_experts(self) -> int:
        """Experts that run in the expert bank (ids ``0 .. num_bank_experts - 1``)."""
        return self.num_experts - self.num_free_experts

    def split_free(self) -> tuple["Assignment", "Assignment | None"]:
        """``(bank_pairs, free_pairs)``: the pairs for the expert bank, over ``num_bank_experts`` experts, and the
        pairs for compute-free experts with ids renumbered from 0 (None when there are none). Priority order is kept
        within each part. Balance losses should read the full assignment (all experts)."""
        if self.num_free_experts == 0:
            return self, None
        nb = self.num_bank_experts
        is_bank_N = self.expert_N < nb
        is_free_N = ~is_bank_N
        bank = Assignment(
            token_N=self.token_N[is_bank_N],
            expert_N=self.expert_N[is_bank_N],
            weight_N=self.weight_N[is_bank_N],
            num_tokens=self.num_tokens,
            num_experts=nb,
            scores_TE=None if self.scores_TE is None else self.scores_TE[:, :nb],
            logits_TE=None if self.logits_TE is None else self.logits_TE[:, :nb],
        )
        free = Assignment(
            token_N=self.token_N[is_free_N],
            expert_N=self.expert_N[is_free_N] - nb,
            weight_N=self.weight_N[is_free_N],
            num_tokens=self.num_tokens,
            num_experts=self.num_free_experts,
        )
        return bank, free

    def with_counts(self, routed_E: Tensor | None, token_mask_T: Tensor | None) -> "Assignment":
        """This assignment with ``routed_E`` and ``token_mask_T`` set (``dataclasses.replace`` without re-running
        ``__init__``: the layer calls it on every forward)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__["routed_E"], new.__dict__["token_mask_T"] = routed_E, token_mask_T
        return new

    def counts_E(self) -> Tensor:
        """Pairs per expert before any dropping, over the real (unmasked) tokens."""
        if self.token_mask_T is not None:
            return torch.bincount(self.expert_N[self.pair_mask_N()], minlength=self.num_experts)
        if self.routed_E is not None:
            return self.routed_E
        return torch.bincount(self.expert_N, minlength=self.num_experts)

    def pair_mask_N(self) -> Tensor | None:
        """bool (N,): the pairs of real tokens (None when there is no token mask)."""
        return None if self.token_mask_T is None else self.token_mask_T[self.token_N]

    @property
    def num_real_tokens(self) -> int:
        """Tokens that count for balance and statistics (all of them without a token mask)."""
        return self.num_tokens if self.token_mask_T is None else int(self.token_mask_T.sum())

    @property
    def num_real_pairs(self) -> int:
        return self.num_pairs if self.token_mask_T is None else int(self.pair_mask_N().sum())

    def real_rows(self, v_T: Tensor) -> Tensor:
        """The rows of a per-token tensor (T, ...) that belong to real tokens."""
        return v_T if self.token_mask_T is None else v_T[self.token_mask_T]

    def check(self) -> None:
        """Validate shapes and ranges (used by tests and by routers written by users)."""
        n = self.token_N.shape
        if self.expert_N.shape != n or self.weight_N.shape != n or len(n) != 1:
            raise ValueError(
                f"Assignment fields must be 1-D of equal length, got token {tuple(self.token_N.shape)}, "
                f"expert {tuple(self.expert_N.shape)}, weight {tuple(self.weight_N.shape)}"
            )
        if self.token_mask_T is not None and tuple(self.token_mask_T.shape) != (self.num_tokens,):
            raise ValueError(f"token_mask_T must have shape ({self.num_tokens},), got {tuple(self.token_mask_T.shape)}")
        if self.token_N.numel():
            if int(self.token_N.min()) < 0 or int(self.token_N.max()) >= self.num_tokens:
                raise ValueError(f"token index out of range [0, {self.num_tokens})")
            if int(self.expert_N.min()) < 0 or int(self.expert_N.max()) >= self.num_experts:
                raise ValueError(f"expert index out of range [0, {self.num_experts})")

    @staticmethod
    def from_topk(
        idx_TK: Tensor,
        weight_TK: Tensor,
        num_experts: int,
        scores_TE: Tensor | None = None,
        logits_TE: Tensor | None = None,
    ) -> "Assignment":
        """Pairs from a (T, K) top-k grid, slot-major: every token's first choice, then every second choice."""
        T, K = idx_TK.shape
        if T == 1:  # one token (decode): its K pairs, no transpose needed
            token_N, expert_N, weight_N = idx_TK.new_zeros(K), idx_TK.reshape(K), weight_TK.reshape(K)
        else:
            token_N = torch.arange(T * K, device=idx_TK.device)
            token_N = token_N % T if T > 0 else token_N  # 0..T-1, K times (cheaper than arange(T).repeat(K))
            expert_N, weight_N = idx_TK.t().reshape(-1), weight_TK.t().reshape(-1)
        return Assignment(
            token_N=token_N,
            expert_N=expert_N,
            weight_N=weight_N,
            num_tokens=T,
            num_experts=num_experts,
            scores_TE=scores_TE,
            logits_TE=logits_TE,
            num_slots=K,
        )
