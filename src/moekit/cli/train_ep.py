"""``moekit train-ep``: train a small MoE model with expert parallelism (EP) x data parallelism (DP).

Run under torchrun, one process per device (gloo on CPU, NCCL on GPU)::

    torchrun --nproc-per-node 2 -m moekit train-ep --ep-size 2 --steps 50
    torchrun --nproc-per-node 4 -m moekit train-ep --ep-size 2 --balance global --save ckpt/
    torchrun --nproc-per-node 4 -m moekit train-ep --ep-size 2 --fsdp fsdp --ckpt run/ --ckpt-every 20 --resume

The task is synthetic and generated on the fly (nothing is downloaded): inputs come from a mixture of clusters and
each cluster has its own random target map, so experts have something to specialise on. Every rank draws its own
micro-batch; the global batch is ``world_size * batch``.
"""

from __future__ import annotations

from ._validate import existing_dir, nonnegative_int, out_dir, positive_float, positive_int


def add_arguments(p) -> None:
    p.add_argument("--ep-size", type=positive_int, default=None, help="expert-parallel size (default: the world size)")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=positive_int, default=16, help="tokens per sequence")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64, help="hidden size of each expert")
    p.add_argument("--shared-hidden", type=int, default=0, help="hidden size of a shared expert (0: none)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dispatch", choices=("dropless", "capacity"), default="dropless")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--balance", choices=("micro", "global", "none"), default="global",
                   help="Switch loss over each rank's micro-batch or over the global batch (Qiu et al. 2025)")
    p.add_argument("--balance-coef", type=float, default=0.01)
    p.add_argument("--aux-free", type=float, default=0.0, help="auxiliary-loss-free bias rate (0: off)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ddp", action="store_true", help="reduce dense gradients with DDP instead of by hand")
    p.add_argument("--fsdp", choices=("none", "fsdp", "hsdp"), default="none",
                   help="FSDP2 for the dense parameters: shard over the world (fsdp), or over the EP dimension and "
                        "replicate over DP (hsdp)")
    p.add_argument("--expert-sharding", choices=("fsdp", "replicate"), default="fsdp",
                   help="with --fsdp: also FSDP-shard each EP block of experts over its DP replicas (default), or not")
    p.add_argument("--ckpt", default=None, help="directory for distributed (DCP) checkpoints with optimizer state")
    p.add_argument("--ckpt-every", type=nonnegative_int, default=0, help="save a DCP checkpoint every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest DCP checkpoint in --ckpt (saved at any mesh) when there is one")
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds a collective waits for a peer")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl if CUDA is available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=out_dir, default=None, help="directory for a sharded checkpoint at the end")
    p.add_argument("--load", type=existing_dir, default=None, help="sharded checkpoint to start from (any EP size)")
    p.add_argument("--log-every", type=positive_int, default=10)


def _model(args):
    import torch
    from torch import nn

    from moekit import AuxFree, Capacity, Dropless, MoE, SwiGLU, SwitchLoss, TopK

    balance = []
    if args.balance != "none":
        balance.append(SwitchLoss(coef=args.balance_coef))
    if args.aux_free > 0:
        balance.append(AuxFree(rate=args.aux_free))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(args.dim, args.dim)
            self.norm = nn.LayerNorm(args.dim)
            self.moe = MoE(
                args.dim, args.experts, router=TopK(k=args.k), experts=SwiGLU(hidden_dim=args.hidden),
                shared_experts=SwiGLU(hidden_dim=args.shared_hidden) if args.shared_hidden else None,
                dispatch=Capacity(factor=args.capacity_factor) if args.dispatch == "capacity" else Dropless(),
                balance=tuple(balance),
            )
            self.out = nn.Linear(args.dim, args.dim)

        def forward(self, x):
            h = self.inp(x)
            return self.out(h + self.moe(self.norm(h)))

    torch.manual_seed(args.seed)  # the same initial weights on every rank, before sharding
    return Net()


class _Task:
    """Clusters with their own target maps; a rank's batch for a step depends only on (seed, step, rank)."""

    def __init__(self, dim: int, seed: int, clusters: int = 8) -> None:
        import torch

        g = torch.Generator().manual_seed(10_000 + seed)
        self.centers = torch.randn(clusters, dim, generator=g) * 2
        self.maps = torch.randn(clusters, dim, dim, generator=g) / dim**0.5
        self.seed = seed

    def batch(self, step: int, rank: int, batch: int, seq: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 4099 + rank)
        c = torch.randint(len(self.centers), (batch, 1), generator=g).expand(batch, seq)  # one cluster per sequence
        x = self.centers[c] + torch.randn(batch, seq, self.centers.shape[1], generator=g)
        y = torch.tanh(torch.einsum("bsd,bsed->bse", x, self.maps[c]))
        return x, y


def run(args) -> int:
    import os
    import time

    import torch
    import torch.distributed as dist

    from moekit import aux_loss, track_routing
    from moekit.parallel import (
        apply_expert_parallel, apply_fsdp, init_distributed, load_dcp, load_sharded, read_latest,
        reduce_expert_gradients, reduce_gradients, save_dcp, save_sharded, update_balance_bias_distributed, wrap_ddp,
    )

    if not dist.is_torchelastic_launched() and "RANK" not in os.environ:
        raise SystemExit("moekit train-ep: launch it with torchrun, e.g. torchrun --nproc-per-node 2 -m moekit train-ep")
    world = int(os.environ["WORLD_SIZE"])
    fsdp = args.fsdp != "none"
    if fsdp and args.ddp:
        raise SystemExit("moekit train-ep: --fsdp and --ddp exclude each other (FSDP2 reduces the gradients itself)")
    if fsdp and args.save:
        raise SystemExit("moekit train-ep: with --fsdp save with --ckpt (distributed checkpoint), not --save")
    if args.resume and not args.ckpt:
        raise SystemExit("moekit train-ep: --resume needs --ckpt DIR")
    groups = init_distributed(args.ep_size or world, backend=args.backend, timeout_s=args.timeout)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rank0 = groups.rank == 0

    model = _model(args)
    # every rank checks that all built the same model (configs, shapes, seed) before the first collective
    apply_expert_parallel(model, groups, global_balance=args.balance == "global", seed=args.seed)
    if args.load:
        load_sharded(model, args.load)
    model.to(device).train()
    plan = apply_fsdp(model, groups, dense=args.fsdp, experts=args.expert_sharding) if fsdp else None
    net = wrap_ddp(model, groups) if args.ddp else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    task = _Task(args.dim, args.seed)
    first = 1
    if args.resume and read_latest(args.ckpt) is not None:
        manifest = load_dcp(model, opt, args.ckpt, groups)
        first = int(manifest["step"]) + 1
        if rank0:
            print(f"resumed from {args.ckpt}/{manifest['checkpoint']} (step {manifest['step']}, saved at mesh "
                  f"{manifest['mesh']})", flush=True)
    if rank0:
        n_local = sum(p.numel() for p in model.moe.experts.parameters())
        mesh = f"; FSDP2 dense={args.fsdp} experts={plan.experts}" if plan is not None else ""
        print(f"world {groups.world_size} = EP {groups.ep_size} x DP {groups.dp_size}{mesh}; "
              f"{args.experts} experts, {args.experts // groups.ep_size} per rank ({n_local} expert parameters); "
              f"balance={args.balance}, dispatch={args.dispatch}, backend={dist.get_backend()}", flush=True)
    t_start = time.perf_counter()
    for step in range(first, args.steps + 1):
        x, y = (t.to(device) for t in task.batch(step, groups.rank, args.batch, args.seq))
        with track_routing(model) as stats:
            opt.zero_grad(set_to_none=True)
            mse = torch.nn.functional.mse_loss(net(x), y)
            loss = mse + aux_loss(model)
            loss.backward()
        if plan is not None:
            plan.reduce_gradients()  # whatever FSDP2 does not reduce (replicated experts)
        elif args.ddp:
            reduce_expert_gradients(model, groups)
        else:
            reduce_gradients(model, groups)
        opt.step()
        update_balance_bias_distributed(model, groups.world)
        if args.ckpt and (step == args.steps or (args.ckpt_every and step % args.ckpt_every == 0)):
            where = save_dcp(model, opt, args.ckpt, groups, step=step, extra={"seed": args.seed})
            if rank0:
                print(f"saved distributed checkpoint (step {step}) to {where}", flush=True)
        if step % args.log_every == 0 or step == args.steps:
            routed = stats["moe"].routed_per_expert_E.clone().double()
            logged = torch.stack([mse.detach().double(), loss.detach().double()])
            dist.all_reduce(routed)
            dist.all_reduce(logged)
            logged /= groups.world_size
            if rank0:
                print(f"step {step:5d}  mse {logged[0]:.4f}  loss {logged[1]:.4f}  "
                      f"max/mean load {float(routed.max() / routed.mean()):.2f}  "
                      f"{(time.perf_counter() - t_start) / (step - first + 1) * 1e3:.1f} ms/step", flush=True)
    if args.save:
        save_sharded(model, args.save, groups)
        if rank0:
            print(f"saved sharded checkpoint (EP {groups.ep_size}) to {args.save}", flush=True)
    dist.destroy_process_group()
    return 0
