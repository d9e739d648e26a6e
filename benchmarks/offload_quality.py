"""Quality of compressed experts on real text: held-out perplexity of an HF MoE checkpoint (e.g. the trained
Qwen3-MoE of ``moekit train-lm``) with int8 / int4 experts and with 25% / 50% of the experts pruned or merged, each
method beside frequency pruning, and a plot of perplexity against memory.

Held-out text is the validation side of :func:`moekit.lm.corpora.split_text` (the last 5% of each of 20 blocks of
each corpus), exactly as ``moekit train-lm`` splits it, so none of it was trained on:

- ``bible``: the King James Bible from the Debian package ``bible-kjv`` (data in ``bible-kjv-text``);
- ``wiki``: gensim's English Wikipedia test sample (PyPI ``gensim``, its ``test_data`` file only);
- ``code``: the running interpreter's CPython standard library ``.py`` files (no package).

Calibration sequences for pruning / merging come from the training side of the same split.

    python benchmarks/offload_quality.py /work/artifacts/lm30/moe --out /tmp/moekit_quality \
        --plot docs/img/offload_quality.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

METHODS = ("frequency", "reap", "naee", "merge", "hc-smoe")


def held_out_and_calib(tok, domains, max_chars, block, val_blocks, calib_seqs, val_fraction=0.05):
    """{domain: [n, block + 1] held-out token blocks} and a list of [1, block] calibration sequences."""
    import torch

    from moekit.lm.corpora import load_domain, split_text
    from moekit.lm.data import encode

    held, calib = {}, []
    per_domain = max(1, calib_seqs // len(domains))
    for d in domains:
        train, val = split_text(load_domain(d, max_chars), (1 - val_fraction, val_fraction))
        v = encode(tok, val)
        n = min(val_blocks, v.numel() // (block + 1))
        if n < 1:
            raise SystemExit(f"offload_quality: domain {d!r} has too little held-out text for --block={block}")
        held[d] = v[: n * (block + 1)].reshape(n, block + 1)
        step = max(1, len(train) // per_domain)  # evenly spaced windows over the training text
        for i in range(per_domain):
            ids = encode(tok, train[i * step: i * step + 12 * block])
            if ids.numel() >= block:
                calib.append(ids[:block][None])
    return held, calib


def perplexity(model, held) -> dict:
    """Token-weighted held-out perplexity per domain and overall (next-token cross-entropy on every position)."""
    import torch

    tot, n, out = 0.0, 0, {}
    with torch.no_grad():
        for d, blocks in held.items():
            s, c = 0.0, 0
            for b in blocks:
                logits = model(b[None, :-1]).logits[0].float()
                s += torch.nn.functional.cross_entropy(logits, b[1:], reduction="sum").item()
                c += b.numel() - 1
            out[d] = math.exp(s / c)
            tot, n = tot + s, n + c
    out["all"] = math.exp(tot / n)
    out["tokens"] = n
    return out


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--domains", default="bible,wiki,code")
    ap.add_argument("--max-chars", type=int, default=1_500_000, help="characters per corpus (train-lm's default)")
    ap.add_argument("--block", type=int, default=128, help="tokens per held-out block (train-lm's default)")
    ap.add_argument("--val-blocks", type=int, default=64, help="held-out blocks per domain (train-lm scores 16)")
    ap.add_argument("--calib-seqs", type=int, default=48, help="calibration sequences (from the training text)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="calibration tokens per layer kept for scoring")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--removed", default="25,50", help="percent of experts removed per layer")
    ap.add_argument("--quant", default="int8,int4")
    ap.add_argument("--group-size", type=int, default=64, help="quantisation group size")
    ap.add_argument("--pregate-steps", type=int, default=300, help="train a pre-gate (0: skip that measurement)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/moekit_quality", help="folder for results.json / results.md")
    ap.add_argument("--plot", default="", help="PNG path for perplexity vs memory (e.g. docs/img/offload_quality.png)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
    removed = [int(r) for r in args.removed.split(",") if r]
    if any(not 0 < r < 100 for r in removed):
        ap.error(f"--removed={args.removed!r}: percentages in (0, 100)")
    quants = [q for q in args.quant.split(",") if q]
    if any(q not in ("int8", "int4") for q in quants):
        ap.error(f"--quant={args.quant!r}: int8 and/or int4")
    domains = [d for d in args.domains.split(",") if d]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.offload import QuantConfig, load_offloaded
    from moekit.offload.loader import find_experts_modules
    from moekit.offload.prune import compress_model

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    src = Path(args.model_dir)
    tok = AutoTokenizer.from_pretrained(src)
    held, calib = held_out_and_calib(tok, domains, args.max_chars, args.block, args.val_blocks, args.calib_seqs)
    print(f"held-out tokens per domain: { {d: int(b.numel() - b.shape[0]) for d, b in held.items()} }; "
          f"{len(calib)} calibration sequences of {args.block}", flush=True)

    def load_full():
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    rows = []

    def record(name, kind, level, mem, ppl, extra=None):
        row = {"name": name, "kind": kind, "level": level, "memory_mib": mem / 2**20, "ppl": ppl, **(extra or {})}
        rows.append(row)
        print(f"{name:>22s}: perplexity {ppl['all']:.3f} ({', '.join(f'{d} {ppl[d]:.2f}' for d in held)}) "
              f"memory {mem / 2**20:.2f} MiB [{time.perf_counter() - t_start:.0f} s]", flush=True)

    full = load_full()
    full_bytes = model_bytes(full)
    mods = find_experts_modules(full)
    E = mods[0][1].num_experts
    expert_bytes = sum(p.numel() * p.element_size() for _, m in mods for p in m.parameters(recurse=False))
    record("float32", "base", 0, full_bytes, perplexity(full, held))
    base = rows[0]["ppl"]["all"]
    del full

    if args.pregate_steps > 0:  # Pre-gated MoE: next-layer expert prediction on held-out text, router reuse vs pre-gate
        from moekit.offload.pregate import prediction_quality, record_routing, train_pregate

        full = load_full()
        routers = {L: full.get_submodule(p.rsplit(".", 1)[0]).gate for L, (p, _) in enumerate(find_experts_modules(full))}
        pg = train_pregate(full, calib, routers, steps=args.pregate_steps)
        rec = record_routing(full, [b[None, :-1] for blocks in held.values() for b in blocks])
        pregate_rows = {"router reuse": prediction_quality(rec, routers), "pre-gate": prediction_quality(rec, pg)}
        for name, q in pregate_rows.items():
            print(f"next-layer prediction ({name}, held-out): precision = recall = {q['recall']:.3f}", flush=True)
        del full
    else:
        pregate_rows = {}

    for q in quants:
        om = load_offloaded(src, "100%", quant=QuantConfig(bits=q, group_size=args.group_size), dtype=torch.float32)
        rt = om.runtime
        q_bytes = sum(rt._load((L, 0))[0].nbytes * s.num_experts for L, s in rt.sources.items())
        record(q, "quant", q, om.non_expert_bytes + q_bytes, perplexity(om.model, held))
        om.close()

    for r in removed:
        keep = max(1, round(E * (100 - r) / 100))
        for m in methods:
            model = load_full()
            t0 = time.perf_counter()
            compress_model(model, calib, m, keep, args.max_tokens)
            secs = time.perf_counter() - t0
            record(f"{m} -{r}%", m, r, model_bytes(model), perplexity(model, held),
                   {"experts_kept": keep, "compress_s": secs})
            del model

    for row in rows:
        row["vs_float32"] = row["ppl"]["all"] / base - 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model_dir": str(src), "args": vars(args), "num_experts": E, "model_mib": full_bytes / 2**20,
            "expert_mib": expert_bytes / 2**20, "held_out_tokens": rows[0]["ppl"]["tokens"], "rows": rows,
            "sources": {"bible": "Debian bible-kjv (bible-kjv-text)", "wiki": "PyPI gensim test_data",
                        "code": "CPython stdlib .py files of the running interpreter"},
            "prefetch_prediction": pregate_rows, "wall_s": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(meta, indent=1))
    table = format_table(rows, list(held))
    head = (f"{src}: {E} experts per layer, {full_bytes / 2**20:.1f} MiB float32 ({expert_bytes / full_bytes:.0%} "
            f"experts); held-out perplexity on {meta['held_out_tokens']} tokens ({', '.join(held)})\n\n")
    if pregate_rows:
        table += ("\n\nnext-layer expert prediction on the held-out tokens (top-k predicted per token, precision = "
                  "recall): " + ", ".join(f"{k} {v['recall']:.3f}" for k, v in pregate_rows.items()))
    (out / "results.md").write_text(head + table + "\n")
    print(head + table)
    if args.plot:
        plot(rows, args.plot, str(src.name))
        print(f"plot: {args.plot}")
    return 0


def format_table(rows, domains) -> str:
    lines = ["| configuration | memory MiB | perplexity | vs float32 | " + " | ".join(domains) + " |",
             "|---|---|---|---|" + "---|" * len(domains)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['memory_mib']:.2f} | {r['ppl']['all']:.3f} | {r['vs_float32']:+.2%} | "
                     + " | ".join(f"{r['ppl'][d]:.3f}" for d in domains) + " |")
    return "\n".join(lines)


def plot(rows, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next(r for r in rows if r["kind"] == "base")
    ax.scatter([base["memory_mib"]], [base["ppl"]["all"]], marker="*", s=160, color="black", label="float32", zorder=3)
    q = [r for r in rows if r["kind"] == "quant"]
    if q:
        ax.plot([base["memory_mib"]] + [r["memory_mib"] for r in q], [base["ppl"]["all"]] + [r["ppl"]["all"] for r in q],
                "s--", color="tab:gray", label="int8 / int4 experts")
        for r in q:
            ax.annotate(r["name"], (r["memory_mib"], r["ppl"]["all"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    for m in METHODS:
        pts = sorted((r for r in rows if r["kind"] == m), key=lambda r: -r["memory_mib"])
        if pts:
            xs = [base["memory_mib"]] + [r["memory_mib"] for r in pts]
            ys = [base["ppl"]["all"]] + [r["ppl"]["all"] for r in pts]
            ax.plot(xs, ys, "o-", label=m + (" (baseline)" if m == "frequency" else ""),
                    linewidth=2.5 if m == "frequency" else 1.2)
    ax.set_xlabel("model memory (MiB)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{title}: compressed experts, perplexity vs memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
