"""MoE++ expert-forward throughput against a vanilla MoE with the same FFN experts, in one interleaved run.

Shape (BENCHMARKS.md, "moe++"): T=4096 tokens, D=512, F=1024, 8 SwiGLU FFN experts, k=2; MoE++ adds 4
zero-computation experts (2 constant, 1 copy, 1 zero). Both layers are timed end to end (router, dispatch,
experts, combine), forward and forward+backward, each repeat timing every implementation once in turn. The
denominator is the vanilla MoE of the same repeat; the dense FFN with k*F hidden units (the active-FLOPs floor)
is timed alongside for context.

An untrained MoE++ router spreads tokens roughly evenly over the 12 experts, so a token reaches about
2 * 8/12 = 1.33 FFN experts. A trained router sends fewer tokens to zero-computation experts (the paper reports
about 1.5 to 1.8 FFN experts per token). To time those operating points without training, ``--ffn-targets`` adds a
constant offset to the FFN experts' logits through the gating residual (G = I, prev_logits = offset on the FFN
columns), found by bisection so that the mean FFN experts per token reaches each target; each row reports the mean
it reached and the ideal speedup 2 / that mean.

Vanilla top-k assignments take the dispatcher's grid fast path; MoE++ assignments (split into FFN and
zero-computation pairs) take the generic sort path. The row "vanilla top-2 (sort path)" runs the vanilla layer on
the generic path too, to separate the saving from zero-computation experts from the difference between the paths.

    python benchmarks/moepp.py                # the BENCHMARKS.md shape, 2 threads, tcmalloc when installed
    python benchmarks/moepp.py --quick        # a smoke run on a small shape
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8, help="FFN experts (both layers)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--ffn-targets", type=float, nargs="*", default=[1.5, 1.75],
                   help="mean FFN experts per token to reach with a logit offset (the untrained router always runs)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--quick", action="store_true", help="T=512, D=128, F=256, 3 repeats")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--no-tcmalloc", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.dim, args.hidden, args.repeats = 512, 128, 256, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if (args.device == "cpu" and not args.no_tcmalloc and "tcmalloc" not in os.environ.get("LD_PRELOAD", "")
            and os.path.exists(TCMALLOC)):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  dict(os.environ, LD_PRELOAD=TCMALLOC))

    import torch

    from moekit import MoE, SwiGLU, TopK
    from moekit.bench.layer_bench import environment
    from moekit.bench.timing import interleaved
    from moekit.routers import MoEPP

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if dev.type == "cpu" else "bfloat16"))
    T, D, F, N, k = args.tokens, args.dim, args.hidden, args.experts, args.k
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    vanilla = MoE(D, N, router=TopK(k=k), experts=SwiGLU(hidden_dim=F)).to(dev, dtype)
    moepp = MoE(D, N, router=MoEPP(k=k, constant=2, copy=1, zero=1, gating_residual=True),
                experts=SwiGLU(hidden_dim=F)).to(dev, dtype)
    moepp.experts.load_state_dict(vanilla.experts.state_dict())  # the same 8 FFN experts
    with torch.no_grad():
        moepp.router.residual.weight.copy_(torch.eye(N + 4))
    dense = SwiGLU(hidden_dim=k * F).build_dense(D).to(dev, dtype)
    x = torch.randn(T, D, device=dev, dtype=dtype)

    class SortPath(torch.nn.Module):
        """The same router, its assignment stripped of the grid marker: the dispatcher takes the generic path."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x_TD, task=None):
            a = self.inner(x_TD, task=task)
            return dataclasses.replace(a, num_slots=None) if hasattr(a, "num_slots") else a

    vanilla_sort = MoE(D, N, router=SortPath(vanilla.router), experts=SwiGLU(hidden_dim=F)).to(dev, dtype)
    vanilla_sort.experts = vanilla.experts

    def offset_prev(off):
        prev = torch.zeros(T, N + 4, device=dev, dtype=torch.float32)
        prev[:, :N] = off
        return prev

    @torch.no_grad()
    def ffn_at(off):
        return moepp.forward_with_aux(x, prev_logits=offset_prev(off)).stats.experts_per_token

    offsets = {"untrained": 0.0}
    for target in args.ffn_targets:  # the mean is monotone in the offset: bisect
        lo, hi = 0.0, 1.0
        while ffn_at(hi) < target and hi < 1e3:
            hi *= 2
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ffn_at(mid) < target else (lo, mid)
        offsets[f"target {target:g}"] = hi
    prevs = {name: offset_prev(off) for name, off in offsets.items()}
    ffn_per_token = {name: ffn_at(off) for name, off in offsets.items()}

    def call(mode, fn):
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    fn()
                sync()
        else:
            xg = x.detach().clone().requires_grad_(True)

            def run():
                fn(xg).float().square().mean().backward()
                sync()
        return run

    env = environment()
    env["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else env["processor"]
    print(f"moe++ bench: T={T} D={D} F={F} {N} FFN + 4 zero-compute experts, k={k}, {dtype}, device {env['device']}, "
          f"torch {env['torch']}, threads {env['threads']}, allocator {env['allocator']}")
    rows = []
    for mode in args.modes:
        fns = {
            f"dense floor (F={k * F})": call(mode, lambda xx=x: dense(xx)),
            "vanilla top-2": call(mode, lambda xx=x: vanilla(xx)),
            "vanilla top-2 (sort path)": call(mode, lambda xx=x: vanilla_sort(xx)),
        }
        for name, p in prevs.items():
            fns[f"moe++ {name} (offset {offsets[name]:.3g})"] = call(mode, lambda xx=x, p=p: moepp(xx, prev_logits=p))
        res = interleaved(fns, "vanilla top-2", args.repeats)
        for name, t in res.items():
            key = next((n for n in offsets if name.startswith(f"moe++ {n} ")), None)
            ffn = ffn_per_token[key] if key is not None else (float(k) if name.startswith("vanilla") else None)
            lo, hi = t.ratio_iqr
            rows.append({
                "bench": "moe++", "shape": f"T={T},D={D},F={F},E={N}+4,k={k}", "mode": mode, "impl": name,
                "median_ms": 1e3 * t.median, "time_iqr_ms": [1e3 * v for v in t.time_iqr],
                "time_over_vanilla": t.ratio, "time_over_vanilla_iqr": [lo, hi],
                "throughput_vs_vanilla": 1.0 / t.ratio, "ffn_experts_per_token": ffn,
                "ideal_speedup": (k / ffn) if ffn else None, "repeats": len(t.times),
            })
    print("\n| mode | impl | FFN experts/token | median ms | throughput vs vanilla | (IQR) | ideal 2/FFN |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["time_over_vanilla_iqr"]
        ffn = "" if r["ffn_experts_per_token"] is None else f"{r['ffn_experts_per_token']:.3f}"
        ideal = "" if r["ideal_speedup"] is None else f"{r['ideal_speedup']:.2f}x"
        print(f"| {r['mode']} | {r['impl']} | {ffn} | {r['median_ms']:.1f} | {r['throughput_vs_vanilla']:.2f}x | "
              f"{1 / hi:.2f}-{1 / lo:.2f} | {ideal} |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**env, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
