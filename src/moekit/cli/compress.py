"""``moekit compress``: prune or merge experts of an HF MoE checkpoint from calibration tokens and write a smaller
checkpoint plain transformers loads; prints the size and held-out perplexity before and after."""

from __future__ import annotations

METHODS = ("frequency", "reap", "naee", "merge", "hc-smoe")


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", help="checkpoint directory written by save_pretrained")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--keep", default="50%", help="experts kept per layer: '50%%' or a count")
    parser.add_argument("--calib", required=True,
                        help="calibration tokens: text (with the checkpoint's tokenizer), integer ids, or a .pt tensor;"
                             " the last 20%% of sequences are held out for perplexity")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=2048, help="calibration tokens per layer kept for scoring")
    parser.add_argument("--threads", type=int, default=None)


def _size(d) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def perplexity(model, seqs) -> float:
    import math

    import torch

    tot, n = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logits = model(s[None]).logits[0, :-1].float()
            tot += torch.nn.functional.cross_entropy(logits, s[1:], reduction="sum").item()
            n += s.numel() - 1
    return math.exp(tot / n)


def run(args) -> int:
    from pathlib import Path

    src, out = Path(args.model_dir), Path(args.out)
    if not (src / "config.json").is_file():
        raise SystemExit(f"moekit compress: MODEL_DIR={args.model_dir!r} has no config.json")
    if out.resolve() == src.resolve():
        raise SystemExit("moekit compress: --out must differ from MODEL_DIR")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"moekit compress: --out={args.out!r} exists and is not empty")
    if args.seq_len < 2:
        raise SystemExit(f"moekit compress: --seq-len={args.seq_len}: expected >= 2")
    import torch

    from moekit.offload.tokens import file_token_ids, load_tokenizer

    tok = load_tokenizer(src)
    try:
        ids = file_token_ids(args.calib, tok)
    except ValueError as e:
        raise SystemExit(f"moekit compress: {e}")
    seqs = [ids[i:i + args.seq_len] for i in range(0, ids.numel() - args.seq_len + 1, args.seq_len)]
    if len(seqs) < 2:
        raise SystemExit(f"moekit compress: --calib has {ids.numel()} tokens; need at least 2 sequences of "
                         f"--seq-len={args.seq_len}")
    n_eval = max(1, len(seqs) // 5)
    calib, held = seqs[:-n_eval], seqs[-n_eval:]
    from transformers import AutoModelForCausalLM

    from moekit.offload.prune import compress_model, parse_keep

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab:
        raise SystemExit(f"moekit compress: --calib has token id {int(ids.max())}, the vocabulary has {vocab}")
    from moekit.offload.loader import find_experts_modules

    mods = find_experts_modules(model)
    if not mods:
        raise SystemExit(f"moekit compress: {type(model).__name__} has no experts module to compress")
    try:
        parse_keep(args.keep, mods[0][1].num_experts)
    except ValueError as e:
        raise SystemExit(f"moekit compress: --{e}")
    E0 = mods[0][1].num_experts
    ppl0 = perplexity(model, held)
    try:
        compress_model(model, [s[None] for s in calib], args.method, args.keep, args.max_tokens)
    except ValueError as e:
        raise SystemExit(f"moekit compress: {e}")
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ppl1 = perplexity(back, held)
    b0, b1 = _size(src), _size(out)
    print(f"method {args.method}, keep {args.keep}: {E0} -> "
          f"{find_experts_modules(back)[0][1].num_experts} experts per layer")
    print(f"size {b0 / 2**20:.2f} MiB -> {b1 / 2**20:.2f} MiB ({b1 / b0:.1%})")
    print(f"held-out perplexity ({sum(s.numel() for s in held)} tokens) {ppl0:.3f} -> {ppl1:.3f}")
    print(f"wrote {out}")
    return 0
