"""Expert-parallel training entry point; the same as ``moekit train-ep``.

    torchrun --nproc-per-node 2 examples/train_ep.py --ep-size 2 --steps 50
    torchrun --nproc-per-node 4 examples/train_ep.py --ep-size 2 --balance global --save /tmp/ckpt
    torchrun --nproc-per-node 4 examples/train_ep.py --ep-size 2 --fsdp fsdp --ckpt /tmp/run --resume   # EP2 x FSDP2

The loop itself is in src/moekit/cli/train_ep.py (build the model with the same seed on every rank,
``apply_expert_parallel``, optionally ``apply_fsdp``, then per step: backward, ``reduce_gradients`` (or the FSDP
plan's), ``optimizer.step()``, ``update_balance_bias_distributed``; ``save_dcp`` / ``load_dcp``). See docs/parallel.md.
"""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-ep", *sys.argv[1:]]))
