"""``DispatchPlan``: the one plan type of every dispatcher, local and expert-parallel.

A plan is immutable and made by ``Dispatcher.plan(a, group_size)`` before any row moves. It has three parts:

- **this process's pairs** (what the gather and the weighted scatter read): ``token_N`` / ``weight_N`` of the kept
  pairs sorted by expert, ``num_tokens``, and the grid fast path (``order_N``, ``inv_order_N``, ``num_slots``);
- **the expert bank on this process** (what ``experts(x_ND, counts_E, expert_N)`` runs; named after the bank's
  arguments): ``counts_E`` rows per expert of this process's bank, ``expert_N`` the bank expert of each row;
- **the accounting** over all E routed experts, of this process's tokens: ``routed_E`` (before dropping: what
  balance losses count) and ``kept_E`` (after dropping: statistics).

Without expert parallelism the bank is the whole set of experts, so ``counts_E`` is ``kept_E``. Under expert
parallelism ``exchange`` describes the all-to-all (:class:`RowExchange`) and ``counts_E`` / ``expert_N`` describe
the rows *received* for this rank's experts. Whatever rows have to be carried from ``dispatch`` to ``combine`` travel
in the handle ``dispatch`` returns, never on the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class RowExchange:
    """How rows cross an expert-parallel group: this rank's rows are sent in rank blocks of ``send_splits`` and
    arrive in source-rank blocks of ``recv_splits``; ``order_M`` reorders the arrived rows from source-major to
    bank-expert-major (row m of the bank's input is arrived row ``order_M[m]``) and ``inverse_M`` undoes it."""

    send_splits: tuple[int, ...]  # rows sent to each rank of the group
    recv_splits: tuple[int, ...]  # rows received from each rank of the group
    order_M: Tensor  # bank row m reads arrived (source-major) row order_M[m]
    inverse_M: Tensor  # arrived row j is bank row inverse_M[j]


@dataclass(frozen=True)
class DispatchPlan:
    """Kept pairs sorted by expert, what the bank runs, and the counts; see the module docstring."""

    # this process's kept pairs, sorted by expert (stable: the router's priority order within an expert)
    token_N: Tensor  # token of each kept pair
    weight_N: Tensor  # combine weight of each kept pair (in grid order when ``inv_order_N`` is set)
    num_tokens: int  # T, tokens of this call on this process
    # the expert bank on this process
    counts_E: Tensor  # rows per bank expert, in the order the rows reach the bank
    expert_N: Tensor  # bank expert of each row (grouped: 0..0, 1..1, ...)
    # accounting over all E routed experts, this process's tokens
    routed_E: Tensor  # pairs per routed expert before dropping (balance losses)
    kept_E: Tensor  # pairs per routed expert after dropping (statistics)
    # grid fast path (dropless top-k): the sort permutation of the grid pairs (pair j*T + t), its inverse, and K
    order_N: Tensor | None = None
    inv_order_N: Tensor | None = None
    num_slots: int | None = None
    # expert parallelism: the all-to-all of the rows (None: the bank is on this process)
    exchange: RowExchange | None = None

    @property
    def num_dropped(self) -> Tensor:
        """Pairs of this process's tokens that were dropped (capacity dispatch)."""
        return self.routed_E.sum() - self.kept_E.sum()
