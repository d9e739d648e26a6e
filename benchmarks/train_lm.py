"""The recorded ``moekit train-lm`` run of docs/real_models.md: an 8-expert top-2 Qwen3-MoE LM (4 layers, width 128,
local 4k BPE) and its dense baseline with the same active parameters, on KJV Bible + Wikipedia sample + stdlib code.

    python benchmarks/train_lm.py [--out /tmp/moekit_reports/train_lm] [extra train-lm flags]

Each model trains 4000 steps or 14 minutes of wall time, whichever ends first (the cosine decay follows whichever
ends first); in the recorded run the clock stopped both (MoE at step 3124, dense at 3773), 28 minutes in all.
Resumable: run it again after an interruption and it continues from the last checkpoint in the report folder.
Needs ``apt-get install bible-kjv`` and ``pip install --no-deps gensim`` (for its Wikipedia sample file).
"""

from __future__ import annotations

import sys

RECORDED = ["--steps", "4000", "--minutes", "14", "--anneal-by-time", "--threads", "1", "--batch", "8",
            "--block", "128", "--lr", "3e-3", "--warmup", "30", "--val-blocks", "48",
            "--dim", "128", "--layers", "4", "--experts", "8", "--k", "2", "--expert-hidden", "256",
            "--export-dir", "/work/artifacts/lm30"]


def main(argv: list[str] | None = None) -> int:
    from moekit.cli import main as moekit_main

    argv = sys.argv[1:] if argv is None else argv
    if "--out" not in argv:
        argv = ["--out", "/tmp/moekit_reports/train_lm", *argv]
    return moekit_main(["train-lm", *RECORDED, *argv])


if __name__ == "__main__":
    raise SystemExit(main())
