"""Expert-parallel benchmark: bytes sent per step against the theoretical all-to-all volume, and step time at
1, 2 and 4 local gloo processes (weak scaling: a fixed number of tokens per rank, EP size = world size).

    python benchmarks/ep.py                     # defaults: D=128, F=256, E=8, k=2, 1024 tokens per rank
    python benchmarks/ep.py --worlds 1 2 4 --tokens 2048 --steps 20 --out benchmarks/results/ep_cpu.json

Per step = forward + backward of one MoE layer (no optimizer). Volumes count only rows that leave a rank.
- measured: bytes the all-to-all exchanges sent (CommCounter), forward and backward;
- exact: 4 exchanges (dispatch, combine, and their backwards) x pairs routed to another rank's experts x D x bytes;
- uniform: the textbook volume for perfectly balanced routing, 4 x T k (R-1)/R x D x bytes per rank.
On CPU the processes share the machine's cores, so step time does not show what separate devices would give.

    python benchmarks/ep.py --meshes --world 4  # EP x DP / FSDP2 / HSDP meshes: bytes, step time, memory per rank

``--meshes`` trains a small model (Linear -> MoE -> Linear, AdamW) on every mesh of one world size, in interleaved
rounds, and reports per rank: all-to-all bytes (measured), gradient/parameter collective bytes (computed from the
parameter sizes with the ring algorithms: all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n of the
tensor), the median step time relative to plain EP x DP, and the parameter + optimizer-state bytes held by each
rank (deterministic: the local shards).
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


MESHES = {  # name -> (EP size as a fraction of the world: "world" or an int, dense mode, expert mode)
    "EP=W (no DP)": ("world", "replicate", "replicate"),
    "EP2 x DP": (2, "replicate", "replicate"),
    "EP2 x FSDP": (2, "fsdp", "fsdp"),
    "EP2 x HSDP": (2, "hsdp", "replicate"),
    "EP1 x FSDP": (1, "fsdp", "fsdp"),
}


def _ring_bytes(n: int, nbytes: float, kind: str) -> float:
    if n <= 1:
        return 0.0
    return nbytes * (2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n)


def _collective_bytes(model, groups, dense: str, experts: str) -> float:
    """Bytes a rank sends per step for parameters and gradients (ring algorithms; no all-to-all)."""
    from moekit.parallel import dense_parameters, expert_parameters

    def size(ps):
        total = 0
        for _, p in ps:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            total += full.numel() * full.element_size()
        return total

    dense_b, expert_b = size(dense_parameters(model)), size(expert_parameters(model))  # expert_b: this EP block
    W, ep, dp = groups.world_size, groups.ep_size, groups.dp_size
    out = 0.0
    if dense == "replicate":
        out += _ring_bytes(W, dense_b, "all_reduce")
    elif dense == "fsdp":  # all-gather in forward and again in backward, reduce-scatter of the gradients
        out += 2 * _ring_bytes(W, dense_b, "all_gather") + _ring_bytes(W, dense_b, "reduce_scatter")
    else:  # hsdp: shard over ep, replicate over dp
        out += 2 * _ring_bytes(ep, dense_b, "all_gather") + _ring_bytes(ep, dense_b, "reduce_scatter")
        out += _ring_bytes(dp, dense_b / ep, "all_reduce")
    if experts == "replicate":
        out += _ring_bytes(dp, expert_b, "all_reduce")
    else:
        out += 2 * _ring_bytes(dp, expert_b, "all_gather") + _ring_bytes(dp, expert_b, "reduce_scatter")
    return out


def mesh_worker(rank: int, world: int, cfg: dict, out_path: str) -> None:
    from torch import nn

    from moekit import MoE, SwiGLU, TopK
    from moekit.parallel import apply_expert_parallel, apply_fsdp, build_groups, memory_per_rank

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(cfg["dim"], cfg["dim"])
            self.moe = MoE(cfg["dim"], cfg["experts"], router=TopK(k=cfg["k"]),
                           experts=SwiGLU(hidden_dim=cfg["hidden"]), shared_experts=SwiGLU(hidden_dim=cfg["hidden"]))
            self.out = nn.Linear(cfg["dim"], cfg["dim"])

        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.moe(h))

    setups = {}
    for name, (ep, dense, experts) in MESHES.items():
        ep = world if ep == "world" else ep
        if world % ep or cfg["experts"] % ep or (name != "EP=W (no DP)" and ep == world and dense == "replicate"):
            continue
        groups = build_groups(ep_size=ep)
        torch.manual_seed(0)
        model = apply_expert_parallel(Net(), groups)
        plan = apply_fsdp(model, groups, dense=dense, experts=experts) if dense != "replicate" else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        setups[name] = dict(groups=groups, model=model, plan=plan, opt=opt, dense=dense, experts=experts,
                            times=[], ep=ep)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(cfg["tokens"], cfg["dim"], generator=g)
    y = torch.randn(cfg["tokens"], cfg["dim"], generator=g)

    def step(s):
        from moekit.parallel import reduce_gradients

        s["opt"].zero_grad(set_to_none=True)
        nn.functional.mse_loss(s["model"](x), y).backward()
        if s["plan"] is not None:
            s["plan"].reduce_gradients()
        else:
            reduce_gradients(s["model"], s["groups"])
        s["opt"].step()

    for s in setups.values():  # warm up (optimizer state, FSDP buffers)
        for _ in range(cfg["warmup"]):
            step(s)
        s["model"].moe.dispatcher.counter.reset()
    for _ in range(cfg["rounds"]):  # interleaved, so that load changes hit every mesh alike
        for s in setups.values():
            for _ in range(cfg["steps"]):
                dist.barrier()
                t0 = time.perf_counter()
                step(s)
                dist.barrier()
                s["times"].append(time.perf_counter() - t0)
    rows = {}
    for name, s in setups.items():
        c = s["model"].moe.dispatcher.counter
        n = cfg["rounds"] * cfg["steps"]
        mem = memory_per_rank(s["model"], s["opt"])
        res = torch.tensor([statistics.median(s["times"]), c.token_bytes / n,
                            _collective_bytes(s["model"], s["groups"], s["dense"], s["experts"]),
                            mem["param_bytes"], mem["optim_bytes"]], dtype=torch.float64)
        gathered = [torch.zeros_like(res) for _ in range(world)]
        dist.all_gather(gathered, res)
        allr = torch.stack(gathered)
        q = sorted(s["times"])
        rows[name] = dict(
            ep=s["ep"], dp=world // s["ep"], dense=s["dense"], experts=s["plan"].experts if s["plan"] else "replicate",
            step_ms_median=float(allr[:, 0].max()) * 1e3,
            step_ms_spread_rank0=[q[len(q) // 4] * 1e3, q[(3 * len(q)) // 4] * 1e3],
            all_to_all_bytes_per_rank=float(allr[:, 1].mean()),
            param_collective_bytes_per_rank=float(allr[:, 2].max()),
            param_bytes_per_rank=float(allr[:, 3].max()), optim_bytes_per_rank=float(allr[:, 4].max()),
        )
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))


def main_meshes(args) -> int:
    from moekit.parallel import spawn_local

    cfg = dict(dim=args.dim, hidden=args.hidden, experts=args.experts, k=args.k, tokens=args.tokens,
               steps=args.steps, warmup=args.warmup, rounds=args.rounds)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"moekit_ep_mesh_{os.getpid()}.json"
    spawn_local(mesh_worker, args.world, cfg, str(tmp), timeout_s=300)
    rows = json.loads(tmp.read_text())
    tmp.unlink(missing_ok=True)
    base = rows.get("EP2 x DP") or next(iter(rows.values()))
    print(f"world {args.world}; Linear-MoE-Linear D={args.dim} F={args.hidden} E={args.experts} k={args.k} (+ shared "
          f"SwiGLU F={args.hidden}), {args.tokens} tokens per rank, float32, AdamW; forward + backward + step; gloo, "
          f"1 thread per process on {os.cpu_count()} shared CPU cores; {args.rounds} interleaved rounds x "
          f"{args.steps} steps")
    print("| mesh | EP x DP | dense / experts | step ms (median, slowest rank) | vs EP2 x DP | all-to-all / rank | "
          "param+grad collectives / rank | params / rank | optimizer state / rank | (params+opt) vs EP2 x DP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_mem = base["param_bytes_per_rank"] + base["optim_bytes_per_rank"]
    for name, r in rows.items():
        mem = r["param_bytes_per_rank"] + r["optim_bytes_per_rank"]
        print(f"| {name} | {r['ep']} x {r['dp']} | {r['dense']} / {r['experts']} | {r['step_ms_median']:.1f} | "
              f"{r['step_ms_median'] / base['step_ms_median']:.2f} | {r['all_to_all_bytes_per_rank'] / 1e6:.3f} MB | "
              f"{r['param_collective_bytes_per_rank'] / 1e6:.3f} MB | {r['param_bytes_per_rank'] / 1e6:.3f} MB | "
              f"{r['optim_bytes_per_rank'] / 1e6:.3f} MB | {mem / base_mem:.2f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(config=cfg, world=args.world, torch=torch.__version__,
                                                  results=rows), indent=1))
    return 0


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
    p.add_argument("--meshes", action="store_true", help="compare EP x DP / FSDP2 / HSDP meshes at --world processes")
    p.add_argument("--world", type=int, default=4, help="processes for --meshes")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --meshes")
    args = p.parse_args(argv)
    if args.meshes:
        return main_meshes(args)
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
