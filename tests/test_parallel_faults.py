"""A rank that dies or hangs makes the others raise moekit.parallel.CollectiveError within the process-group
timeout instead of hanging. Processes are started by hand (not mp.spawn, which would kill the survivor as soon as
one rank exits) and the survivor reports through a queue."""


import pytest
import torch.multiprocessing as mp

from moekit.parallel import free_port

import _parallel_workers as W

TIMEOUT_S = 3.0


@pytest.mark.parametrize("mode", ["killed", "hung"])
def test_dead_or_hung_rank_raises_within_timeout(mode):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=W.fault_worker, args=(r, 2, port, mode, TIMEOUT_S, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        kind, msg, elapsed = queue.get(timeout=120)  # generous: process start-up on a loaded 2-core machine
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    assert kind == "CollectiveError", (kind, msg)
    assert "failed on global rank 0" in msg and "timeout" in msg, msg
    assert elapsed < TIMEOUT_S + 5.0, f"the survivor needed {elapsed:.1f} s to notice (timeout {TIMEOUT_S} s)"
