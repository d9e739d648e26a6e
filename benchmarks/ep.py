"""Expert-parallel benchmark: bytes sent per step against the theoretical all-to-all volume, and step time at
1, 2 and 4 local gloo processes (weak scaling: a fixed number of tokens per rank, EP size = world size).

    python benchmarks/ep.py                     # defaults: D=128, F=256, E=8, k=2, 1024 tokens per rank
    python benchmarks/ep.py --worlds 1 2 4 --tokens 2048 --steps 20 --out benchmarks/results/ep_cpu.json

Per step = forward + backward of one MoE layer (no optimizer). Volumes count only rows that leave a rank.
- measured: bytes the all-to-all exchanges sent (CommCounter), forward and backward;
- exact: 4 exchanges (dispatch, combine, and their backwards) x pairs routed to another rank's experts x D x bytes;
- uniform: the textbook volume for perfectly balanced routing, 4 x T k (R-1)/R x D x bytes per rank.
On CPU the processes share the machine's cores, so step time does not show what separate devices would give.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def worker(rank: int, world: int, cfg: dict, out_path: str) -> None:
    from moekit import MoE, SwiGLU, TopK
    from moekit.parallel import build_groups, shard_experts

    groups = build_groups(ep_size=world)
    torch.manual_seed(0)
    layer = MoE(cfg["dim"], cfg["experts"], router=TopK(k=cfg["k"]), experts=SwiGLU(hidden_dim=cfg["hidden"]))
    if world > 1:
        shard_experts(layer, groups.ep)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(cfg["tokens"], cfg["dim"], generator=g).requires_grad_()
    gy = torch.randn(cfg["tokens"], cfg["dim"], generator=g)
    times, remote_pairs = [], 0
    counter = getattr(layer.dispatcher, "counter", None)
    E_local = cfg["experts"] // world
    for step in range(cfg["warmup"] + cfg["steps"]):
        if step == cfg["warmup"] and counter is not None:
            counter.reset()
        dist.barrier()
        t0 = time.perf_counter()
        out = layer.forward_with_aux(x)
        (out.y * gy).sum().backward()
        dist.barrier()
        dt = time.perf_counter() - t0
        if step >= cfg["warmup"]:
            times.append(dt)
            routed = out.stats.tokens_per_expert_E
            mine = routed[groups.ep_rank * E_local:(groups.ep_rank + 1) * E_local].sum()
            remote_pairs += int(routed.sum() - mine)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    row_bytes = cfg["dim"] * x.element_size()
    res = torch.tensor([
        statistics.median(times),
        (counter.token_bytes if counter else 0) / cfg["steps"],
        (counter.count_bytes if counter else 0) / cfg["steps"],
        4 * remote_pairs / cfg["steps"] * row_bytes,
    ], dtype=torch.float64)
    all_res = [torch.zeros_like(res) for _ in range(world)]
    dist.all_gather(all_res, res)
    if rank == 0:
        R, T, k = world, cfg["tokens"], cfg["k"]
        rows = torch.stack(all_res)
        summary = dict(
            world=world, ep_size=world, tokens_per_rank=T,
            step_ms_median_max_rank=float(rows[:, 0].max()) * 1e3,
            bytes_sent_per_rank_measured=float(rows[:, 1].mean()),
            bytes_sent_per_rank_exact=float(rows[:, 3].mean()),
            bytes_sent_per_rank_uniform=4 * T * k * (R - 1) / R * row_bytes,
            count_bytes_per_rank=float(rows[:, 2].mean()),
        )
        Path(out_path).write_text(json.dumps(summary))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args(argv)
    from moekit.parallel import spawn_local

    cfg = {k: getattr(args, k) for k in ("dim", "hidden", "experts", "k", "tokens", "steps", "warmup")}
    results = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"moekit_ep_bench_{os.getpid()}.json"
    for world in args.worlds:
        spawn_local(worker, world, cfg, str(tmp), timeout_s=300)
        results.append(json.loads(tmp.read_text()))
    tmp.unlink(missing_ok=True)
    print(f"MoE D={args.dim} F={args.hidden} E={args.experts} k={args.k}, {args.tokens} tokens per rank, float32, "
          f"forward+backward, gloo on {os.cpu_count()} CPU cores shared by all processes (1 thread each)")
    print("| processes (EP) | step ms (median, slowest rank) | sent/rank measured | exact from routing | "
          "uniform theory | measured/uniform | count exchange |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        u = r["bytes_sent_per_rank_uniform"]
        ratio = f"{r['bytes_sent_per_rank_measured'] / u:.3f}" if u else "-"
        print(f"| {r['world']} | {r['step_ms_median_max_rank']:.1f} | {r['bytes_sent_per_rank_measured'] / 1e6:.3f} MB | "
              f"{r['bytes_sent_per_rank_exact'] / 1e6:.3f} MB | {u / 1e6:.3f} MB | {ratio} | "
              f"{r['count_bytes_per_rank']:.0f} B |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(config=cfg, torch=torch.__version__, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
