"""transformers MoE causal LMs on HF's experts implementations vs moekit's, in one interleaved run.

Models (random weights, no download), one row group each:

- ``qwen3_moe``: Qwen3-MoE, hidden 256, 2 layers, 8 experts of 512, top-2;
- ``gpt_oss``: gpt-oss (transposed, interleaved gate/up with biases, clamped SwiGLU), hidden 256, 2 layers,
  16 experts of 256, top-4;
- ``deepseek_v3``: a DeepSeek-V3-like fine-grained config, hidden 256, 2 layers, 64 routed experts of 64 units,
  top-6, one shared expert, sigmoid routing with correction bias.

Timed, each repeat running every implementation once in turn (ratios compare neighbours of the same repeat):

- ``train``: forward + backward of a (B=4, S=128) batch (sum of squared logits), gradients on every parameter;
- ``generate``: greedy generation (a 16-token prompt, batch 1, exactly 16 new tokens): tokens per second.

Implementations: HF ``grouped_mm`` (transformers' default) and ``batched_mm`` (its decode choice on accelerators),
``moekit experts`` (the same model with ``experts_implementation="moekit"``), and ``moekit swap`` (a deep copy after
``moekit.convert.swap_hf_moe``, where that architecture is supported). The ratio column is time over the fastest HF
implementation of the same repeat. Outputs and greedy tokens are checked equal to HF eager before timing.

    python benchmarks/hf_swap.py                       # all three models, 2 threads, tcmalloc when installed
    python benchmarks/hf_swap.py --archs gpt_oss --out results.jsonl
    python benchmarks/hf_swap.py --quick               # a smoke run
    python benchmarks/hf_swap.py --hidden 1024 --modes generate   # a bandwidth-bound size (weights leave the cache)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"
ARCHS = ("qwen3_moe", "gpt_oss", "deepseek_v3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="*", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--gen-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="hidden 64, S=32, 8 new tokens, 3 repeats")
    p.add_argument("--modes", nargs="*", default=["train", "generate"], choices=["train", "generate"],
                   help="which timings to run (generate alone for large hidden sizes, where HF batched_mm's "
                        "training copies the expert weights of every token)")
    p.add_argument("--no-hugepages", action="store_true",
                   help="keep the weights on 4 KiB pages (by default every model, HF's and moekit's, is moved onto "
                        "transparent huge pages with moekit.hugepages.to_hugepages where the kernel offers them)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--no-tcmalloc", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.seq, args.new_tokens, args.repeats, args.gen_repeats = 64, 32, 8, 3, 3
    return args


def build_model(arch: str, args):
    import torch
    import transformers as t

    D = args.hidden
    common = dict(vocab_size=args.vocab, hidden_size=D, num_hidden_layers=args.layers, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=2 * args.seq + 64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if arch == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**common, head_dim=D // 4, intermediate_size=4 * D, moe_intermediate_size=2 * D,
                               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    elif arch == "gpt_oss":
        cfg = t.GptOssConfig(**common, head_dim=D // 4, intermediate_size=D, num_local_experts=16,
                             num_experts_per_tok=4, sliding_window=64)
    else:
        cfg = t.DeepseekV3Config(**common, intermediate_size=4 * D, moe_intermediate_size=D // 4, n_routed_experts=64,
                                 num_experts_per_tok=6, n_shared_experts=1, n_group=1, topk_group=1,
                                 first_k_dense_replace=0, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16,
                                 qk_nope_head_dim=32, v_head_dim=32)
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm").eval()
    with torch.no_grad():  # a routing that is not degenerate (DeepSeek's correction bias, gpt-oss's biases)
        for name, p in model.named_parameters():
            if p.dim() == 1 and "bias" in name:
                p.normal_(0, 0.02)
    return model


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: list of seconds}; each repeat runs every function once, in a rotating order."""
    names = list(fns)
    for n in names:
        fns[n]()  # warm-up
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(_time(fns[n]))
    return times


def _iqr(v: list[float]) -> tuple[float, float]:
    if len(v) < 4:
        return min(v), max(v)
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def bench_arch(arch: str, args, env: dict) -> list[dict]:
    import torch

    import moekit.convert  # noqa: F401  (registers "moekit")
    from moekit.convert import swap_hf_moe

    hf = build_model(arch, args)
    models = {
        "HF grouped_mm": (hf, "grouped_mm"), "HF batched_mm": (hf, "batched_mm"), "moekit experts": (hf, "moekit"),
    }
    swap_note = ""
    try:
        mk = copy.deepcopy(hf)
        swap_hf_moe(mk)
        models["moekit swap"] = (mk, None)
    except Exception as e:  # noqa: BLE001 (reported in the output)
        swap_note = f"swap_hf_moe n/a: {str(e).splitlines()[0][:90]}"

    if not args.no_hugepages:  # every model's weights on huge pages where the kernel has them (moekit.hugepages)
        from moekit.hugepages import to_hugepages

        for m in {id(m): m for m, _ in models.values()}.values():
            to_hugepages(m)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=g)
    gen_kw = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)

    def use(name):
        model, impl = models[name]
        if impl is not None:
            model.set_experts_implementation(impl)
        return model

    check_ids = ids if "train" in args.modes else prompt  # generation only: check the logits on the prompt
    with torch.no_grad():
        ref = use("HF grouped_mm")
        ref.set_experts_implementation("eager")
        y_ref = ref(check_ids).logits
        tok_ref = ref.generate(prompt, **gen_kw)
        checks = {}
        for name in models:
            m = use(name)
            err = (m(check_ids).logits - y_ref).abs().max().item()
            checks[name] = (err, torch.equal(m.generate(prompt, **gen_kw), tok_ref))

    def train(name):
        def run():
            m = use(name)
            m.zero_grad(set_to_none=True)
            m(ids).logits.pow(2).mean().backward()
        return run

    def generate(name):
        def run():
            with torch.no_grad():
                use(name).generate(prompt, **gen_kw)
        return run

    shape = {"qwen3_moe": "E=8 k=2 F=2D", "gpt_oss": "E=16 k=4 F=D", "deepseek_v3": "E=64 k=6 F=D/4 +1 shared"}[arch]
    summary = "; ".join(f"{n}: max|dlogits| {e:.1e}, tokens equal {s}" for n, (e, s) in checks.items())
    print(f"\n{arch}: D={args.hidden} L={args.layers} {shape}; {summary}" + (f"; {swap_note}" if swap_note else ""))
    rows = []
    timings = {
        "train": (f"train fwd+bwd B={args.batch} S={args.seq}", train, args.repeats, args.batch * args.seq),
        "generate": (f"generate 1x{args.prompt}+{args.new_tokens}", generate, args.gen_repeats, args.new_tokens),
    }
    for mode, make, reps, unit in (timings[m] for m in args.modes):
        times = interleaved({n: make(n) for n in models}, reps)
        hf_names = [n for n in times if n.startswith("HF")]
        best_per_rep = [min(times[n][r] for n in hf_names) for r in range(reps)]
        best_hf = min(hf_names, key=lambda n: statistics.median(times[n]))
        for name, ts in times.items():
            ratios = [t / b for t, b in zip(ts, best_per_rep)]
            rows.append({
                "bench": "hf_swap", "arch": arch, "shape": f"D={args.hidden} L={args.layers} {shape}", "mode": mode,
                "impl": name, "median_ms": 1e3 * statistics.median(ts), "time_iqr_ms": [1e3 * v for v in _iqr(ts)],
                "tokens_per_s": unit / statistics.median(ts), "time_over_best_hf": statistics.median(ratios),
                "time_over_best_hf_iqr": list(_iqr(ratios)), "best_hf": best_hf, "repeats": reps,
                "max_abs_logits_diff_vs_eager": checks[name][0], "greedy_tokens_equal_eager": checks[name][1],
                **env,
            })
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_tcmalloc and "tcmalloc" not in os.environ.get("LD_PRELOAD", "") and os.path.exists(TCMALLOC):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                  dict(os.environ, LD_PRELOAD=TCMALLOC))
    warnings.filterwarnings("ignore")

    import torch
    import transformers

    from moekit.bench.layer_bench import environment

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"hf experts bench: float32, {env['processor']}, torch {env['torch']}, transformers {env['transformers']}, "
          f"threads {env['threads']}, allocator {env['allocator']}")
    rows = []
    for arch in args.archs:
        rows += bench_arch(arch, args, env)
    print("\n| model | mode | impl | median ms (IQR) | tokens/s | speedup vs best HF (IQR) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["time_over_best_hf_iqr"]
        t_lo, t_hi = r["time_iqr_ms"]
        print(f"| {r['arch']} | {r['mode']} | {r['impl']} | {r['median_ms']:.1f} ({t_lo:.1f}-{t_hi:.1f}) | "
              f"{r['tokens_per_s']:.1f} | {1 / r['time_over_best_hf']:.2f}x ({1 / hi:.2f}-{1 / lo:.2f}) |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
