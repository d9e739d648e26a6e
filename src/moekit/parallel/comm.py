"""Collectives used by expert parallelism, on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

- :func:`all_to_all` moves rows between the ranks of a group with uneven split sizes and is differentiable: its
  backward is the same exchange with the split sizes swapped.
- :func:`exchange_counts` is the small all-to-all of per-expert row counts that precedes every token exchange.
- Every collective runs through :func:`collective`, which turns a transport failure (a peer that died, or one that
  hung past the process-group timeout) into a :class:`CollectiveError` naming the operation and the rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective of moekit.parallel failed: a peer process died, hung past the process-group timeout, or called
    a different collective."""


def collective(what: str, group: dist.ProcessGroup | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` (one collective) and re-raise transport errors as a :class:`CollectiveError`."""
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as e:  # gloo raises RuntimeError, NCCL DistBackendError
        if isinstance(e, CollectiveError):
            raise
        rank = dist.get_rank() if dist.is_initialized() else -1
        size = dist.get_world_size(group) if dist.is_initialized() else -1
        raise CollectiveError(
            f"moekit.parallel: {what} failed on global rank {rank} (group of {size} ranks). A peer process has "
            "probably died or hung longer than the process-group timeout (set it with "
            f"moekit.parallel.init_distributed(timeout_s=...)). Transport error: {e}"
        ) from e


@dataclass
class CommCounter:
    """Bytes this rank sent to *other* ranks (its own rows do not cross the network)."""

    token_bytes: int = 0  # activations and their gradients
    count_bytes: int = 0  # the per-expert count exchange
    exchanges: int = 0

    def reset(self) -> None:
        self.token_bytes = self.count_bytes = self.exchanges = 0


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group, counter: CommCounter | None) -> Tensor:
    me = dist.get_rank(group)
    if counter is not None:
        row = math.prod(x.shape[1:]) * x.element_size()
        counter.token_bytes += (sum(in_splits) - in_splits[me]) * row
        counter.exchanges += 1
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    collective(
        "all_to_all (tokens)", group,
        lambda: dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group),
    )
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, counter):  # type: ignore[override]
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.counter = out_splits, in_splits, group, counter
        return _exchange(x, out_splits, in_splits, group, counter)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        # the rows came from where they now go back to: swap the split sizes
        grad_in = _exchange(grad_out, ctx.in_splits, ctx.out_splits, ctx.group, ctx.counter)
        return grad_in, None, None, None, None


def all_to_all(
    x: Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup | None = None,
    counter: CommCounter | None = None,
) -> Tensor:
    """Send ``x[sum(in_splits[:r]) : sum(in_splits[:r+1])]`` to rank ``r`` of ``group`` and receive
    ``out_splits[r]`` rows from each rank ``r``, stacked in rank order. Differentiable in ``x``."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, counter)


def exchange_counts(send_RL: Tensor, group: dist.ProcessGroup | None = None, counter: CommCounter | None = None) -> Tensor:
    """``send_RL[r, e]``: rows this rank sends to local expert ``e`` of rank ``r``. Returns ``recv_RL[r, e]``: rows
    rank ``r`` sends to this rank's local expert ``e``."""
    R = send_RL.shape[0]
    if R == 1:
        return send_RL.clone()
    send = send_RL.contiguous()
    recv = torch.empty_like(send)
    if counter is not None:
        counter.count_bytes += (R - 1) * send_RL.shape[1] * send.element_size()
    collective("all_to_all (expert counts)", group, lambda: dist.all_to_all_single(recv, send, group=group))
    return recv


def all_reduce_(t: Tensor, group: dist.ProcessGroup | None = None, what: str = "all_reduce") -> Tensor:
    """In-place sum over ``group`` with the error translation of :func:`collective`."""
    if dist.get_world_size(group) > 1:
        collective(what, group, lambda: dist.all_reduce(t, group=group))
    return t
