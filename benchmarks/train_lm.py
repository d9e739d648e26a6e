"""The recorded ``moekit train-lm`` run of docs/real_models.md: an 8-expert top-2 Qwen3-MoE LM (4 layers, width 128,
local 4k BPE) and its dense baseline with the same active parameters, on KJV Bible + Wikipedia sample + stdlib code.

    python benchmarks/train_lm.py [--out /tmp/moekit_reports/train_lm] [extra train-lm flags]

The MoE trains 640 steps or 13 minutes of wall time, whichever ends first (the cosine decay follows whichever ends
first); in the recorded run the clock stopped it at step 438, so the dense baseline trains 438 steps (the same
tokens; ``--dense-steps``). Resumable: run it again after an interruption and it continues from the last checkpoint in the report folder.
Needs ``apt-get install bible-kjv`` and ``pip install --no-deps gensim`` (for its Wikipedia sample file).
"""

from __future__ import annotations

import sys

RECORDED = ["--steps", "640", "--minutes", "13", "--anneal-by-time", "--threads", "1", "--batch", "8",
            "--block", "128", "--lr", "3e-3", "--warmup", "30", "--dense-steps", "438", "--val-blocks", "48",
            "--dim", "128", "--layers", "4", "--experts", "8", "--k", "2", "--expert-hidden", "256", "--export-dir", "/work/artifacts/lm"]


def main(argv: list[str] | None = None) -> int:
    from moekit.cli import main as moekit_main

    argv = sys.argv[1:] if argv is None else argv
    if "--out" not in argv:
        argv = ["--out", "/tmp/moekit_reports/train_lm", *argv]
    return moekit_main(["train-lm", *RECORDED, *argv])


if __name__ == "__main__":
    raise SystemExit(main())
