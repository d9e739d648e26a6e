"""A transformers MoE causal LM before and after ``moekit.convert.swap_hf_moe``, in one interleaved run.

Model: a random-weight Mixtral (default) or Qwen3-MoE causal LM, hidden 512, 4 layers, 8 experts of 1024 hidden units,
top-2, vocabulary 4096 (no download). Timed, each repeat running every implementation once in turn:

- forward of a (B=4, S=256) batch of token ids, under ``torch.no_grad``;
- greedy generation (``do_sample=False``, a 16-token prompt, batch 1, exactly 32 new tokens): tokens per second.

Implementations: the HF model with ``experts_implementation`` set explicitly to ``eager`` and to ``grouped_mm`` (its
``batched_mm`` gathers a weight copy per token and is skipped, see BENCHMARKS.md), and a deep copy of that model
swapped onto moekit (``share=True``: the moekit layers view the copy's own weights). The ratio column is time over
the HF ``grouped_mm`` time of the same repeat (the default for full models); for generation it is tokens/s over
tokens/s. Logits and greedy tokens are checked equal before timing.

    python benchmarks/hf_swap.py                     # 2 threads, tcmalloc when installed
    python benchmarks/hf_swap.py --arch qwen3_moe --out results.jsonl
    python benchmarks/hf_swap.py --quick             # a smoke run on a small model
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mixtral", choices=["mixtral", "qwen3_moe"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--gen-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impls", nargs="*", default=["eager", "grouped_mm"], help="HF experts implementations to time")
    p.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, S=64, 3 repeats")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--no-tcmalloc", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.expert_hidden, args.layers, args.seq, args.new_tokens = 128, 256, 2, 64, 8
        args.repeats, args.gen_repeats = 3, 3
    return args


def build_model(args):
    import torch
    import transformers as t

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2 * args.seq + 64,
                  num_experts_per_tok=args.k, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if args.arch == "mixtral":
        cfg = t.MixtralConfig(**common, intermediate_size=args.expert_hidden, num_local_experts=args.experts)
        cls = t.MixtralForCausalLM
    else:
        cfg = t.Qwen3MoeConfig(**common, head_dim=args.hidden // 8, moe_intermediate_size=args.expert_hidden,
                               intermediate_size=4 * args.hidden, num_experts=args.experts, norm_topk_prob=True)
        cls = t.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_tcmalloc and "tcmalloc" not in os.environ.get("LD_PRELOAD", "") and os.path.exists(TCMALLOC):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  dict(os.environ, LD_PRELOAD=TCMALLOC))
    warnings.filterwarnings("ignore")

    import torch
    import transformers

    from moekit.bench.layer_bench import environment
    from moekit.bench.timing import interleaved
    from moekit.convert import swap_hf_moe

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    hf = build_model(args)
    hf.set_experts_implementation("grouped_mm")
    mk = copy.deepcopy(hf)
    handle = swap_hf_moe(mk)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=g)
    gen_kw = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    with torch.no_grad():
        ref = hf(ids).logits
        err = (mk(ids).logits - ref).abs().max().item()
        same_tokens = torch.equal(hf.generate(prompt, **gen_kw), mk.generate(prompt, **gen_kw))

    def forward(model, impl=None):
        def run():
            if impl is not None:
                model.set_experts_implementation(impl)
            with torch.no_grad():
                model(ids)
        return run

    def generate(model, impl=None):
        def run():
            if impl is not None:
                model.set_experts_implementation(impl)
            with torch.no_grad():
                model.generate(prompt, **gen_kw)
        return run

    names = {impl: f"HF {impl}" for impl in args.impls}
    env = environment()
    n_params = sum(p.numel() for p in hf.parameters())
    shape = (f"{args.arch} D={args.hidden} F={args.expert_hidden} L={args.layers} E={args.experts} k={args.k} "
             f"V={args.vocab}")
    print(f"hf swap bench: {shape} ({n_params / 1e6:.1f}M params), float32, {env['processor']}, torch {env['torch']}, "
          f"transformers {env['transformers']}, threads {env['threads']}, allocator {env['allocator']}; "
          f"{len(handle)} blocks swapped; max |logits diff| {err:.2e}; greedy tokens equal: {same_tokens}")
    base = "HF grouped_mm" if "grouped_mm" in args.impls else names[args.impls[0]]
    rows = []
    for mode, make, reps, unit in (
        (f"forward B={args.batch} S={args.seq}", forward, args.repeats, args.batch * args.seq),
        (f"generate 1x{args.prompt}+{args.new_tokens}", generate, args.gen_repeats, args.new_tokens),
    ):
        fns = {names[impl]: make(hf, impl) for impl in args.impls}
        fns["moekit swap"] = make(mk)
        res = interleaved(fns, base, reps, warmup=1)
        for name, t in res.items():
            lo, hi = t.ratio_iqr
            rows.append({
                "bench": "hf_swap", "shape": shape, "mode": mode, "impl": name, "median_ms": 1e3 * t.median,
                "time_iqr_ms": [1e3 * v for v in t.time_iqr], "tokens_per_s": unit / t.median,
                "time_over_hf_grouped_mm": t.ratio, "time_over_hf_grouped_mm_iqr": [lo, hi], "repeats": len(t.times),
                "max_abs_logits_diff": err, "greedy_tokens_equal": same_tokens,
            })
    for r in rows:
        print(json.dumps({**env, **r}))
    print(f"\n| mode | impl | median ms (IQR) | tokens/s | speedup vs {base} (IQR) |")
    print("|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["time_over_hf_grouped_mm_iqr"]
        t_lo, t_hi = r["time_iqr_ms"]
        print(f"| {r['mode']} | {r['impl']} | {r['median_ms']:.1f} ({t_lo:.1f}-{t_hi:.1f}) | {r['tokens_per_s']:.1f} | "
              f"{1 / r['time_over_hf_grouped_mm']:.2f}x ({1 / hi:.2f}-{1 / lo:.2f}) |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**env, **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
