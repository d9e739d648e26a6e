"""Run a function on N local processes with torch.distributed initialised (tests, benchmarks, notebooks).

For real jobs use ``torchrun`` (see docs/parallel.md); this helper is ``torch.multiprocessing.spawn`` plus a free
localhost port, a collective timeout and a clean shutdown.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, timeout_s: float, threads: int,
           args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    threads: int = 1,
) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes with the default process group
    initialised; ``fn`` must be importable (module level). An exception in any rank is re-raised here."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    mp.spawn(_entry, args=(fn, world_size, free_port(), backend, timeout_s, threads, args), nprocs=world_size, join=True)
