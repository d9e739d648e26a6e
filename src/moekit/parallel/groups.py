"""Process groups for expert parallelism (EP) combined with data parallelism (DP).

``world_size = dp_size * ep_size``. Ranks are laid out EP-major: the EP groups are blocks of consecutive ranks
(``[0..ep)``, ``[ep..2ep)``, ...), so with one process per GPU and ``ep_size`` at most the GPUs of a node, the
all-to-all stays inside a node. The DP group of a rank holds the ranks with the same EP rank, i.e. the replicas of
the same expert shard; expert gradients are reduced there, dense gradients over the whole world.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def group_layout(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(ep_groups, dp_groups)`` as lists of global ranks for ``world_size`` processes and ``ep_size``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(
            f"expert-parallel size {ep_size} must be >= 1 and divide the world size {world_size}; valid sizes: "
            f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    dp_size = world_size // ep_size
    ep_groups = [list(range(d * ep_size, (d + 1) * ep_size)) for d in range(dp_size)]
    dp_groups = [list(range(e, world_size, ep_size)) for e in range(ep_size)]
    return ep_groups, dp_groups


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's view of the EP x DP layout (build with :func:`build_groups`)."""

    world: dist.ProcessGroup
    ep: dist.ProcessGroup
    dp: dist.ProcessGroup
    rank: int
    world_size: int
    ep_rank: int
    ep_size: int
    dp_rank: int
    dp_size: int
    timeout_s: float | None = None


def world_timeout_s() -> float | None:
    """The collective timeout of the default process group in seconds, or None if it cannot be read."""
    try:
        pg = dist.distributed_c10d._get_default_group()
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        return pg._get_backend(device).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - private API; fall back to torch's default for new groups
        return None


def build_groups(ep_size: int, *, world_size: int | None = None, timeout_s: float | None = None) -> ParallelGroups:
    """Create the EP and DP groups on every rank (a collective: all ranks must call it with the same arguments).
    ``timeout_s`` defaults to the default process group's timeout (torch would give new groups 30 minutes)."""
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed initialised; call moekit.parallel.init_distributed")
    W = dist.get_world_size()
    if world_size is not None and world_size != W:
        raise ValueError(f"build_groups: world_size={world_size} but the process group has {W} ranks")
    ep_groups, dp_groups = group_layout(W, ep_size)
    rank = dist.get_rank()
    if timeout_s is None:  # new groups would otherwise get torch's default (30 min), not the world's timeout
        timeout_s = world_timeout_s()
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    ep = dp = None
    for ranks in ep_groups:  # every rank creates every group, in the same order
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            ep = g
    for ranks in dp_groups:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            dp = g
    assert ep is not None and dp is not None
    return ParallelGroups(
        world=dist.group.WORLD, ep=ep, dp=dp, rank=rank, world_size=W,
        ep_rank=rank % ep_size, ep_size=ep_size, dp_rank=rank // ep_size, dp_size=W // ep_size, timeout_s=timeout_s,
    )


def init_distributed(
    ep_size: int,
    *,
    backend: str | None = None,
    timeout_s: float = 300.0,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> ParallelGroups:
    """Initialise ``torch.distributed`` (from torchrun's environment unless ``init_method``/``rank``/``world_size``
    are given) with a collective timeout, then build the EP and DP groups.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. ``timeout_s`` bounds how long a collective waits
    for a peer: a rank that dies or hangs makes the others raise :class:`moekit.parallel.CollectiveError` instead of
    hanging. With NCCL the timeout is enforced by its watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        kw = {}
        if init_method is not None:
            kw = dict(init_method=init_method, rank=rank, world_size=world_size)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return build_groups(ep_size, timeout_s=timeout_s)
