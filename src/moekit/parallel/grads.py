"""Gradient reduction for expert parallelism combined with data parallelism.

Convention: every rank's loss is the mean over its own micro-batch, and the global loss is the mean over the ranks
(equal micro-batch sizes). Then

- a dense (replicated) parameter's gradient is the mean over all ranks: sum over the world / world size;
- a routed expert's gradient already holds the contributions of every rank of its EP group (the all-to-all backward
  brought them back), so it is summed over its DP group (the replicas of the same shard) and divided by the world
  size, *not* the DP size.

:func:`reduce_gradients` does both by hand (flat buffers, one all-reduce per kind and dtype). :func:`wrap_ddp` lets
DDP reduce the dense parameters (expert parameters ignored, buffers not broadcast) and leaves the expert gradients to
:func:`reduce_expert_gradients`. FSDP2: :func:`moekit.parallel.apply_fsdp` (same rules, via FSDP's reduce-scatter).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .comm import all_reduce_
from .groups import ParallelGroups
from .shard import dense_parameters, expert_parameters


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def _reduce(params: list[nn.Parameter], group, scale: float, what: str) -> None:
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            if p.grad is None:  # every rank must contribute the same buffer layout
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        all_reduce_(flat, group, what)
        flat.mul_(scale)
        for p, chunk in zip(ps, flat.split([p.numel() for p in ps])):
            p.grad.copy_(chunk.view_as(p.grad))


def reduce_expert_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Sum expert gradients over the DP group and divide by the world size (see the module doc)."""
    params = [p for _, p in expert_parameters(_unwrap(model))]
    _reduce(params, groups.dp, 1.0 / groups.world_size, "all_reduce (expert gradients over the DP group)")


def reduce_dense_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Average dense gradients over the world."""
    params = [p for _, p in dense_parameters(_unwrap(model))]
    _reduce(params, groups.world, 1.0 / groups.world_size, "all_reduce (dense gradients over the world)")


def reduce_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Call after ``loss.backward()`` on every rank, before ``optimizer.step()``."""
    reduce_dense_gradients(model, groups)
    reduce_expert_gradients(model, groups)


@torch.no_grad()
def broadcast_parameters(model: nn.Module, groups: ParallelGroups) -> None:
    """Make replicas identical: dense parameters and buffers from global rank 0, expert shards from DP rank 0."""
    model = _unwrap(model)
    expert_ids = {id(p) for _, p in expert_parameters(model)}
    for _, p in model.named_parameters():
        if id(p) in expert_ids:
            if groups.dp_size > 1:
                dist.broadcast(p.data, src=dist.get_global_rank(groups.dp, 0), group=groups.dp)
        elif groups.world_size > 1:
            dist.broadcast(p.data, src=0, group=groups.world)
    for name, b in model.named_buffers():
        if groups.world_size > 1 and not name.endswith("pending_counts_E"):  # per-rank counts, summed elsewhere
            dist.broadcast(b, src=0, group=groups.world)


def wrap_ddp(model: nn.Module, groups: ParallelGroups, **ddp_kwargs) -> DistributedDataParallel:
    """DDP over the world for the dense parameters only. After ``loss.backward()`` call
    :func:`reduce_expert_gradients` (DDP does not touch the expert parameters). Buffers are not broadcast: the
    aux-free pending counts differ per rank by design and are summed by :func:`sync_balance_counts`."""
    names = [n for n, _ in expert_parameters(model)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    ddp_kwargs.setdefault("broadcast_buffers", False)
    return DistributedDataParallel(model, process_group=groups.world, **ddp_kwargs)
