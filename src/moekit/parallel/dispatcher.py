"""All-to-all dispatch for expert parallelism.

The routed experts are split in contiguous blocks over the ranks of the EP group: rank ``r`` owns global experts
``[r * E_local, (r + 1) * E_local)``. Each rank routes its own tokens, then

1. ``plan``: the wrapped local dispatcher groups (and, in capacity mode, drops) this rank's pairs by global expert;
   since the experts of one rank are contiguous, so are the rows bound for it. The per-expert counts are exchanged
   with one ``all_to_all_single`` so that every rank knows how many rows it will receive for each local expert. The
   result is the same immutable :class:`~moekit.dispatch.plan.DispatchPlan` the local dispatcher makes, with
   ``counts_E`` / ``expert_N`` describing the received rows (what this rank's bank runs) and ``exchange`` the splits.
2. ``dispatch``: gather the rows, all-to-all them (uneven splits), and reorder the received rows from
   source-rank-major to local-expert-major, the layout the expert bank wants. Returns the rows and a handle.
3. ``combine``: the inverse: undo the reordering, all-to-all the expert outputs back, then weight and scatter-add
   them into the tokens with the local dispatcher.

The exchange is differentiable (its backward is the reverse exchange), so gradients reach the input, the router
(through the combine weights, which stay on the token's own rank) and every expert.

Capacity mode drops pairs per rank, before the exchange: each rank's tokens form a capacity group (GShard's
groups). With ``Capacity(per_sequence=True)`` that is exactly the single-process layer's behaviour.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..assignment import Assignment
from ..dispatch.plan import DispatchPlan, RowExchange
from .comm import CommCounter, all_to_all, exchange_counts


@dataclass(frozen=True)
class ExchangeHandle:
    """What ``dispatch`` hands to ``combine``: the wrapped dispatcher's handle and the rows this rank received."""

    inner: Any  # the local dispatcher's handle
    received_MD: Tensor  # the rows received for this rank's experts, bank-expert-major


def _segment_gather_index(sizes_RL: Tensor) -> Tensor:
    """Rows arrive as blocks ``(source r, local expert e)`` in source-major order with sizes ``sizes_RL``; return the
    index that lists them expert-major (all rows of expert 0 from rank 0, 1, ..., then expert 1, ...)."""
    sizes = sizes_RL.reshape(-1)
    starts_RL = (torch.cumsum(sizes, 0) - sizes).view_as(sizes_RL)
    sizes_em = sizes_RL.t().reshape(-1)
    starts_em = starts_RL.t().reshape(-1)
    total = int(sizes.sum())
    block_start = torch.repeat_interleave(torch.cumsum(sizes_em, 0) - sizes_em, sizes_em, output_size=total)
    return torch.repeat_interleave(starts_em, sizes_em, output_size=total) + (
        torch.arange(total, device=sizes_RL.device) - block_start
    )


class _GroupRef:
    """Holds a process group; deep copies share it (a group is a handle, and cannot be copied), so that
    ``copy.deepcopy`` of an expert-parallel model works (EMA copies, evaluation clones)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __deepcopy__(self, memo) -> "_GroupRef":
        return self


class AllToAllDispatcher(nn.Module):
    """Wraps a local dispatcher (``Dropless()`` / ``Capacity(...)`` built) and exchanges rows over ``group``.

    Args:
        inner: the layer's local dispatcher; it decides which pairs are kept and how outputs are weighted.
        group: the expert-parallel process group.
        num_experts: the global number of routed experts (divisible by the group size).
    """

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup, num_experts: int) -> None:
        super().__init__()
        size = dist.get_world_size(group)
        if num_experts % size:
            raise ValueError(
                f"expert parallelism: {num_experts} experts cannot be split evenly over an expert-parallel group of "
                f"{size} ranks; choose an EP size that divides the number of experts"
            )
        self.inner = inner
        self._group = _GroupRef(group)
        self.ep_size = size
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // size
        self.counter = CommCounter()

    @property
    def group(self) -> dist.ProcessGroup:
        return self._group.group

    def plan(self, a: Assignment, group_size: int | None = None) -> DispatchPlan:
        if a.num_experts != self.num_experts:
            raise ValueError(f"AllToAllDispatcher: assignment has {a.num_experts} experts, expected {self.num_experts}")
        local = self.inner.plan(a, group_size)  # this rank's kept pairs, sorted by global expert
        R, L = self.ep_size, self.num_local_experts
        send_RL = local.kept_E.view(R, L)
        recv_RL = exchange_counts(send_RL, self.group, self.counter)
        order_M = _segment_gather_index(recv_RL)
        inverse_M = torch.empty_like(order_M)
        inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
        counts_E = recv_RL.sum(0)
        exchange = RowExchange(send_splits=tuple(send_RL.sum(1).tolist()), recv_splits=tuple(recv_RL.sum(1).tolist()),
                               order_M=order_M, inverse_M=inverse_M)
        bank_expert_N = torch.repeat_interleave(torch.arange(L, device=counts_E.device), counts_E)
        return dataclasses.replace(local, counts_E=counts_E, expert_N=bank_expert_N, exchange=exchange)

    def dispatch(self, x_TD: Tensor, plan: DispatchPlan) -> tuple[Tensor, ExchangeHandle]:
        ex = plan.exchange
        x_ND, inner = self.inner.dispatch(x_TD, plan)  # this rank's rows, sorted by global expert
        x_MD = all_to_all(x_ND, ex.recv_splits, ex.send_splits, self.group, self.counter)  # source-major
        x_MD = x_MD.index_select(0, ex.order_M)  # local-expert-major
        return x_MD, ExchangeHandle(inner=inner, received_MD=x_MD)

    def combine(self, y_MD: Tensor, plan: DispatchPlan, handle: ExchangeHandle) -> Tensor:
        ex = plan.exchange
        if y_MD.shape[0] == 0:
            # nothing arrived here, so the experts' (empty) output does not depend on what was received and autograd
            # would skip this rank's half of the dispatch exchange in backward while the other ranks wait for it.
            # An exact zero keeps the graph connected.
            y_MD = y_MD + handle.received_MD.sum() * 0
        y_MD = y_MD.index_select(0, ex.inverse_M)  # back to source-major
        y_ND = all_to_all(y_MD, ex.send_splits, ex.recv_splits, self.group, self.counter)
        return self.inner.combine(y_ND, plan, handle.inner)

    def extra_repr(self) -> str:
        return f"ep_rank={self.ep_rank}, ep_size={self.ep_size}, experts={self.num_experts} ({self.num_local_experts} local)"
