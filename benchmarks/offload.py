"""Offloaded experts vs accelerate's disk offload vs the fully loaded model, on a random Qwen3-MoE checkpoint whose
experts are > 90% of its bytes (generated once under --dir, never in the repository).

Each configuration runs in its own subprocess (clean peak RSS: VmHWM), configurations are interleaved over
--rounds rounds, and medians with min-max spread are reported. Before every run the checkpoint's and accelerate's
offload files are dropped from the OS page cache (posix_fadvise DONTNEED on our own files only), so the first read
of an expert is a real disk read.

Two page-cache regimes, both reported:

- "warm": after that first read the OS may keep the files in its page cache (this machine has far more RAM than the
  checkpoint), so accelerate's per-token re-reads of the offloaded layers and moekit's re-reads of evicted experts are
  memory-to-memory copies: the comparison of a machine whose RAM holds the files after all;
- "cold": the files are dropped from the page cache again after every decoded token (outside the timed region), so
  every byte either method reads comes from the disk: a machine whose RAM cannot hold the checkpoint, the situation
  offloading is for.

    python benchmarks/offload.py --dir /tmp/moekit_offload_bench --rounds 2     # full table (see docs/offload.md)
    python benchmarks/offload.py --quick                                         # small checkpoint, seconds
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


# --quick: the same architecture, small enough to run every configuration in seconds (a smoke test of the script)
QUICK_CONFIG = dict(CONFIG, vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                    num_experts=16, num_experts_per_tok=2, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32)


def make_checkpoint(d: Path, config: dict = CONFIG) -> Path:
    ck = d / "ckpt"
    if (ck / "config.json").exists():
        if json.loads((ck / "config.json").read_text()).get("num_hidden_layers") == config["num_hidden_layers"]:
            return ck
        raise SystemExit(f"{ck} holds a checkpoint of another configuration; pass another --dir")
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**config), dtype=torch.float32)
    model.save_pretrained(ck, max_shard_size="500MB")
    return ck


def drop_page_cache(ck: Path) -> None:
    for f in list(ck.glob("*.safetensors")) + list(ck.rglob("*.dat")):
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
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
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
        decode_s = 0.0
        for _ in range(args.new):
            t0 = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            toks.append(int(tok))
            decode_s += time.perf_counter() - t0
            if args.cold:  # untimed: nothing either method read stays in the page cache for the next token
                if om is not None and om.runtime.prefetcher is not None:
                    om.runtime.prefetcher.drain()
                drop_page_cache(ck)
                if args.offload_folder and Path(args.offload_folder).exists():
                    drop_page_cache(Path(args.offload_folder))
    res = {"kind": kind, "budget": budget, "prefetch": args.prefetch, "cold": args.cold, "impl": args.impl,
           "load_s": load_s,
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


# (kind, budget, prefetch, cold page cache after every token)
RUNS = [("full", "100%", False, False), ("accelerate", "25%", False, False), ("moekit", "25%", False, False)] + [
    ("moekit", b, True, False) for b in ("10%", "25%", "50%", "100%")] + [
    ("accelerate", "25%", False, True), ("moekit", "25%", True, True)]
QUICK_RUNS = [("full", "100%", False, False), ("accelerate", "25%", False, False), ("moekit", "25%", True, False),
              ("moekit", "25%", True, True)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/moekit_offload_bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--impl", default="eager", help="experts implementation for every run (eager, grouped_mm)")
    ap.add_argument("--only", default="", help="comma list of kinds to run (full,accelerate,moekit)")
    ap.add_argument("--quick", action="store_true",
                    help="a small checkpoint under DIR/quick, 4 configurations, 1 round, 8 prompt + 4 new tokens (a smoke "
                         "test of the script, 1-2 min)")
    ap.add_argument("--out", default="", help="results JSON (default DIR/results.json; the table goes to .md beside)")
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
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
    if args.quick:
        d = d / "quick"
        args.rounds, args.prompt, args.new = 1, 8, 4
    d.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ck = make_checkpoint(d, QUICK_CONFIG if args.quick else CONFIG)
    runs = QUICK_RUNS if args.quick else RUNS
    runs = [r for r in runs if not args.only or r[0] in args.only.split(",")]
    results: dict[tuple, list[dict]] = {}
    for rnd in range(args.rounds):
        order = runs[rnd % len(runs):] + runs[: rnd % len(runs)]  # rotate to interleave
        for kind, budget, pf, cold in order:
            drop_page_cache(ck)
            cmd = [sys.executable, __file__, "--child", "--kind", kind, "--budget", budget, "--ckpt", str(ck),
                   "--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.threads), "--impl", args.impl,
                   "--offload-folder", str(d / "accelerate_offload")]
            cmd += (["--prefetch"] if pf else []) + (["--cold"] if cold else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"run {kind} {budget} failed (rc {p.returncode})")
            r = json.loads(line[0][7:])
            results.setdefault((kind, budget, pf, cold), []).append(r)
            print(f"round {rnd} {kind:10s} {budget:>5s} prefetch={pf!s:5s} cold={cold!s:5s} decode "
                  f"{r['decode_tok_s']:.2f} tok/s prefill {r['prefill_tok_s']:.1f} tok/s rss {r['peak_rss_mib']:.0f} MiB",
                  flush=True)
    summary = []
    for (kind, budget, pf, cold), rs in results.items():
        row = {"kind": kind, "budget": budget, "prefetch": pf, "cold": cold, "n": len(rs)}
        for k in rs[0]:
            if isinstance(rs[0][k], float):
                vals = [r[k] for r in rs]
                row[k] = statistics.median(vals)
                row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
        row["tokens_match_full"] = None
        summary.append(row)
    full_toks = results.get(("full", "100%", False, False), [{}])[0].get("tokens")
    for row, rs in zip(summary, results.values()):
        if full_toks is not None:
            row["tokens_match_full"] = all(r["tokens"] == full_toks for r in rs)
    out = Path(args.out) if args.out else d / "results.json"
    load = os.getloadavg()
    meta = {"config": QUICK_CONFIG if args.quick else CONFIG, "args": vars(args), "summary": summary,
            "wall_s": time.perf_counter() - t_start, "loadavg": load}
    out.write_text(json.dumps(meta, indent=1))
    table = format_table(summary)
    head = (f"decode of {args.new} tokens after a {args.prompt}-token prompt, medians of {args.rounds} round(s) "
            f"(min-max), {args.threads} torch thread(s), load average at the end {load[0]:.1f}; "
            f"vs accelerate: against accelerate in the same page-cache regime\n\n")
    out.with_suffix(".md").write_text(head + table + "\n")
    print(head + table)
    print(f"wrote {out} and {out.with_suffix('.md')} ({meta['wall_s']:.0f} s)")
    return 0


def format_table(summary) -> str:
    ref = {(r["kind"], r["cold"]): r for r in summary if r["kind"] != "moekit"}
    full = ref.get(("full", False), {}).get("decode_tok_s")
    lines = ["| run | budget | prefetch | page cache | prefill tok/s | decode tok/s (min-max) | vs accelerate | vs full |"
             " decode hit rate | prefetch P / R | MiB read / token | peak RSS MiB | tokens = full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        acc = ref.get(("accelerate", r["cold"]), {}).get("decode_tok_s")
        cells = [r["kind"], r["budget"], "yes" if r["prefetch"] else "no", "cold" if r["cold"] else "warm",
                 f"{r['prefill_tok_s']:.1f}",
                 f"{r['decode_tok_s']:.2f} ({r['decode_tok_s_min']:.2f}-{r['decode_tok_s_max']:.2f})",
                 f"{r['decode_tok_s'] / acc:.1f}x" if acc else "-", f"{r['decode_tok_s'] / full:.2f}x" if full else "-",
                 f"{r['hit_rate']:.2f}" if "hit_rate" in r else "-",
                 f"{r['prefetch_precision']:.2f} / {r['prefetch_recall']:.2f}" if "prefetch_precision" in r else "-",
                 f"{r['bytes_read_per_token'] / 2**20:.1f}" if "bytes_read_per_token" in r else "-",
                 f"{r['peak_rss_mib']:.0f}", {True: "yes", False: "NO"}.get(r["tokens_match_full"], "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
