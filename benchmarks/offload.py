"""Offloaded experts vs accelerate's disk offload vs the fully loaded model, on a random Qwen3-MoE checkpoint whose
experts are > 90% of its bytes (generated once under --dir, never in the repository).

Each configuration runs in its own subprocess (clean peak RSS: VmHWM), configurations are interleaved over
--rounds rounds, and medians with min-max spread are reported. Before every run the checkpoint's pages are dropped
from the OS page cache (posix_fadvise DONTNEED on our own files only), so the first read of an expert is a real
disk read; later re-reads of an evicted expert may still be served by the page cache.

    python benchmarks/offload.py --dir /tmp/moekit_offload_bench --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_experts=64,
              num_experts_per_tok=4, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=512, norm_topk_prob=True, initializer_range=0.05, tie_word_embeddings=False)


def make_checkpoint(d: Path) -> Path:
    ck = d / "ckpt"
    if (ck / "config.json").exists():
        return ck
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**CONFIG), dtype=torch.float32)
    model.save_pretrained(ck, max_shard_size="500MB")
    return ck


def drop_page_cache(ck: Path) -> None:
    for f in list(ck.glob("*.safetensors")) + list(ck.glob("*.dat")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def child(args) -> dict:
    """One measurement (runs in a subprocess)."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    base_rss = _rss_kib("VmRSS")
    ck = Path(args.ckpt)
    kind, budget = args.kind, args.budget
    om = None
    t0 = time.perf_counter()
    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, experts_implementation=args.impl).eval()
    elif kind == "accelerate":
        import math

        from transformers import AutoConfig

        n_layers = AutoConfig.from_pretrained(ck).num_hidden_layers
        keep = math.floor(n_layers * float(budget.rstrip("%")) / 100)
        dmap = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        for L in range(n_layers):
            for part in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp.gate"):
                dmap[f"model.layers.{L}.{part}"] = "cpu"
            dmap[f"model.layers.{L}.mlp.experts"] = "cpu" if L < keep else "disk"
        model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, device_map=dmap,
                                                     offload_folder=args.offload_folder,
                                                     experts_implementation=args.impl).eval()
    else:
        from moekit.offload import load_offloaded

        om = load_offloaded(ck, budget, prefetch=args.prefetch, policy=args.policy, dtype=torch.float32,
                            inner=args.impl)
        model = om.model
    load_s = time.perf_counter() - t0
    # cold start for every kind alike: drop our checkpoint's and accelerate's offload files from the page cache
    drop_page_cache(ck)
    if args.offload_folder and Path(args.offload_folder).exists():
        drop_page_cache(Path(args.offload_folder))
    ids = torch.randint(3, CONFIG["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if om is not None:
            prefill_stats = om.stats()
            om.cache.reset_stats()
            if om.runtime.prefetcher is not None:
                from moekit.offload.prefetch import PrefetchStats

                om.runtime.prefetcher.stats = PrefetchStats()
        toks = []
        t0 = time.perf_counter()
        for _ in range(args.new):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            toks.append(int(tok))
        decode_s = time.perf_counter() - t0
    res = {"kind": kind, "budget": budget, "prefetch": args.prefetch, "impl": args.impl, "load_s": load_s,
           "prefill_tok_s": args.prompt / prefill_s, "decode_tok_s": args.new / decode_s, "tokens": toks,
           "peak_rss_mib": _rss_kib("VmHWM") / 1024, "base_rss_mib": base_rss / 1024}
    if om is not None:
        st = om.stats()
        res.update(hit_rate=st["cache"]["hit_rate"], bytes_read_per_token=st["cache"]["bytes_read"] / args.new,
                   prefill_hit_rate=prefill_stats["cache"]["hit_rate"], budget_mib=om.budget_bytes / 2**20,
                   non_expert_mib=om.non_expert_bytes / 2**20, expert_mib=om.total_expert_bytes / 2**20,
                   cache_peak_mib=st["cache"]["peak_bytes"] / 2**20)
        if "prefetch" in st:
            res.update(prefetch_precision=st["prefetch"]["precision"], prefetch_recall=st["prefetch"]["recall"])
        om.close()
    return res


RUNS = [("full", "100%", False), ("accelerate", "25%", False), ("moekit", "25%", False)] + [
    ("moekit", b, True) for b in ("10%", "25%", "50%", "100%")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/moekit_offload_bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--impl", default="eager", help="experts implementation for every run (eager, grouped_mm)")
    ap.add_argument("--only", default="", help="comma list of kinds to run (full,accelerate,moekit)")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind"), ap.add_argument("--budget"), ap.add_argument("--ckpt")
    ap.add_argument("--prefetch", action="store_true"), ap.add_argument("--policy", default="lru")
    ap.add_argument("--offload-folder", dest="offload_folder")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.prompt < 1 or args.new < 1:
        ap.error(f"--rounds/--prompt/--new must be >= 1 (got {args.rounds}, {args.prompt}, {args.new})")
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    ck = make_checkpoint(d)
    runs = [r for r in RUNS if not args.only or r[0] in args.only.split(",")]
    results: dict[tuple, list[dict]] = {}
    for rnd in range(args.rounds):
        order = runs[rnd % len(runs):] + runs[: rnd % len(runs)]  # rotate to interleave
        for kind, budget, pf in order:
            drop_page_cache(ck)
            cmd = [sys.executable, __file__, "--child", "--kind", kind, "--budget", budget, "--ckpt", str(ck),
                   "--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.threads), "--impl", args.impl,
                   "--offload-folder", str(d / "accelerate_offload")] + (["--prefetch"] if pf else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run {kind} {budget} failed (rc {p.returncode})")
            r = json.loads(line[0][7:])
            results.setdefault((kind, budget, pf), []).append(r)
            print(f"round {rnd} {kind:10s} {budget:>5s} prefetch={pf!s:5s} decode {r['decode_tok_s']:.2f} tok/s "
                  f"prefill {r['prefill_tok_s']:.1f} tok/s rss {r['peak_rss_mib']:.0f} MiB", flush=True)
    summary = []
    for (kind, budget, pf), rs in results.items():
        row = {"kind": kind, "budget": budget, "prefetch": pf, "n": len(rs)}
        for k in rs[0]:
            if isinstance(rs[0][k], float):
                vals = [r[k] for r in rs]
                row[k] = statistics.median(vals)
                row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
        row["tokens_match_full"] = None
        summary.append(row)
    full_toks = results.get(("full", "100%", False), [{}])[0].get("tokens")
    for row, rs in zip(summary, results.values()):
        if full_toks is not None:
            row["tokens_match_full"] = all(r["tokens"] == full_toks for r in rs)
    out = Path(args.out) if args.out else d / "results.json"
    out.write_text(json.dumps({"config": CONFIG, "args": vars(args), "summary": summary}, indent=1))
    print_table(summary)
    return 0


def print_table(summary) -> None:
    ref = {r["kind"]: r for r in summary if r["kind"] != "moekit"}
    acc = ref.get("accelerate", {}).get("decode_tok_s")
    full = ref.get("full", {}).get("decode_tok_s")
    print("| run | budget | prefetch | prefill tok/s | decode tok/s (min-max) | vs accelerate | vs full | hit rate | "
          "prefetch P / R | MiB read/token | peak RSS MiB | tokens = full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        pr = (f"{r['prefetch_precision']:.2f} / {r['prefetch_recall']:.2f}" if "prefetch_precision" in r else "-")
        print(f"| {r['kind']} | {r['budget']} | {'yes' if r['prefetch'] else 'no'} | {r['prefill_tok_s']:.1f} | "
              f"{r['decode_tok_s']:.2f} ({r['decode_tok_s_min']:.2f}-{r['decode_tok_s_max']:.2f}) | "
              f"{r['decode_tok_s'] / acc if acc else float('nan'):.1f}x | "
              f"{r['decode_tok_s'] / full if full else float('nan'):.2f}x | "
              f"{r.get('hit_rate', float('nan')):.2f} | {pr} | "
              f"{r.get('bytes_read_per_token', float('nan')) / 2**20:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['tokens_match_full']} |")


if __name__ == "__main__":
    sys.exit(main())
