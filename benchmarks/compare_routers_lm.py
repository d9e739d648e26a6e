"""The recorded router comparison of docs/real_models.md (``moekit train-lm --compare``): one small Qwen3-MoE-shaped
LM (2 layers, width 128, 8 experts of hidden 256, a local 4k BPE, 128-token context) trained with each of five
routers and three seeds on KJV Bible + Wikipedia sample + stdlib code, 250 steps of 8 x 128 tokens each (256k
tokens), so that the 15 runs fit in about 12 minutes on one core of the 2-core machine. Validation perplexity per
domain with 95% CIs over seeds and Welch tests against top-2 (+ Holm correction) go to ``compare.md`` /
``compare.json`` / ``compare.png``.

    python benchmarks/compare_routers_lm.py [--out /tmp/moekit_reports/compare_lm] [extra train-lm flags]

Resumable: finished runs are not retrained (each run folder holds its checkpoint).
"""

from __future__ import annotations

import sys

RECORDED = ["--compare", "top2,top2_auxfree,expert_choice,moepp,top_p", "--seeds", "3", "--threads", "1",
            "--vocab", "4096", "--block", "128", "--batch", "8", "--steps", "250", "--lr", "3e-3", "--warmup", "25",
            "--val-blocks", "48", "--dim", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2",
            "--experts", "8", "--k", "2", "--expert-hidden", "256"]


def main(argv: list[str] | None = None) -> int:
    from moekit.cli import main as moekit_main

    argv = sys.argv[1:] if argv is None else argv
    if "--out" not in argv:
        argv = ["--out", "/tmp/moekit_reports/compare_lm", *argv]
    return moekit_main(["train-lm", *RECORDED, *argv])


if __name__ == "__main__":
    raise SystemExit(main())
