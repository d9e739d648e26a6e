"""Expert-parallel training entry point; the same as ``moekit train-ep``.

    torchrun --nproc-per-node 2 examples/train_ep.py --ep-size 2 --steps 50
    torchrun --nproc-per-node 4 examples/train_ep.py --ep-size 2 --balance global --save /tmp/ckpt

The loop itself is in src/moekit/cli/train_ep.py (build the model with the same seed on every rank,
``apply_expert_parallel``, then per step: backward, ``reduce_gradients``, ``optimizer.step()``,
``update_balance_bias_distributed``). See docs/parallel.md.
"""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-ep", *sys.argv[1:]]))
