"""``moekit generate``: greedy generation from an HF MoE checkpoint with experts read from disk through a
byte-bounded cache; prints the text, prefill/decode tokens/s, cache hit rate, bytes read and peak memory."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="checkpoint directory written by save_pretrained (safetensors)")
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    g.add_argument("--prompt-ids", help="prompt as token ids, e.g. '1 5 9' (for checkpoints without a tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--expert-budget", default="25%", help="expert bytes kept in memory: '25%%' or bytes / '2GB'")
    parser.add_argument("--policy", choices=("lru", "lfu", "activation"), default="lru", help="cache eviction")
    parser.add_argument("--prefetch", action="store_true", help="load predicted next-layer experts in the background")
    parser.add_argument("--quant", choices=("none", "int8", "int4"), default="none", help="cached expert precision")
    parser.add_argument("--lowbit-on-miss", action="store_true",
                        help="keep an int4 copy of every expert and compute cache misses with it (HOBBIT; lossy)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON too")
    parser.add_argument("--no-progress", action="store_true")


def _peak_rss_mib() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    # --- validate everything before any work ---
    d = Path(args.model_dir)
    if not (d / "config.json").is_file():
        raise SystemExit(f"moekit generate: MODEL_DIR={args.model_dir!r} has no config.json")
    if args.max_new_tokens < 1:
        raise SystemExit(f"moekit generate: --max-new-tokens={args.max_new_tokens}: expected >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"moekit generate: --threads={args.threads}: expected >= 1")
    from moekit.offload.budget import parse_budget

    try:
        parse_budget(args.expert_budget, 100, 0)
    except ValueError as e:
        raise SystemExit(f"moekit generate: --{e}".replace("expert_budget", "expert-budget"))
    from moekit.offload.tokens import load_tokenizer, parse_ids

    tok = load_tokenizer(d)
    if args.prompt is not None and tok is None:
        raise SystemExit(f"moekit generate: {args.model_dir} has no tokenizer; use --prompt-ids")
    try:
        ids = parse_ids(args.prompt_ids, "--prompt-ids") if args.prompt_ids is not None else tok(args.prompt)["input_ids"]
    except ValueError as e:
        raise SystemExit(f"moekit generate: {e}")

    import torch

    from moekit.offload import CheckpointError, QuantConfig, load_offloaded

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # glibc: a fixed 64 KiB mmap threshold returns freed expert buffers to the OS (no heap fragmentation)
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    quant = QuantConfig(bits=None if args.quant == "none" else args.quant, lowbit_on_miss=args.lowbit_on_miss)
    t0 = time.perf_counter()
    try:
        om = load_offloaded(d, args.expert_budget, policy=args.policy, prefetch=args.prefetch, quant=quant, dtype=dtype)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"moekit generate: {e}")
    vocab = om.model.get_input_embeddings().weight.shape[0]
    if max(ids) >= vocab:
        raise SystemExit(f"moekit generate: --prompt-ids has id {max(ids)}, the vocabulary has {vocab} tokens")
    load_s = time.perf_counter() - t0
    model = om.model
    x = torch.tensor([ids])
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_new_tokens, desc="generating", unit="tok", file=sys.stderr)
    new: list[int] = []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(x, use_cache=True)
        prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        while True:
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(hit=f"{om.cache.stats.hit_rate:.2f}")
            if len(new) >= args.max_new_tokens or nxt in eos:
                break
            out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
        decode_s = time.perf_counter() - t1
    if bar is not None:
        bar.close()
    st = om.stats()
    om.close()
    text = tok.decode(ids + new) if tok is not None else " ".join(map(str, ids + new))
    c = st["cache"]
    print(text)
    print(f"\nprefill {len(ids) / prefill_s:.1f} tok/s | decode {max(len(new) - 1, 1) / max(decode_s, 1e-9):.2f} tok/s"
          f" | load {load_s:.1f} s")
    print(f"cache hit rate {c['hit_rate']:.3f} ({c['hits']} hits, {c['misses']} misses, {c['evictions']} evictions)"
          f" | expert bytes read {c['bytes_read'] / 2**20:.1f} MiB")
    line = (f"budget {st['budget_bytes'] / 2**20:.1f} MiB of {st['total_expert_bytes'] / 2**20:.1f} MiB experts"
            f" | non-expert {st['non_expert_bytes'] / 2**20:.1f} MiB | peak RSS {_peak_rss_mib():.0f} MiB")
    print(line)
    if "prefetch" in st:
        print(f"prefetch precision {st['prefetch']['precision']:.2f} recall {st['prefetch']['recall']:.2f}")
    if args.json:
        print(json.dumps({"new_tokens": new, **st}))
    return 0
