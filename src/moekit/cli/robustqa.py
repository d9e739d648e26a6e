"""``moekit robustqa``: the Robust QA recipe on CPU (Switch-upcycled MiniLM vs dense, in-domain and held out)."""

from __future__ import annotations

from ._validate import nonnegative_int, out_file, positive_int


def add_arguments(parser) -> None:
    from dataclasses import fields

    from ..recipes.robust_qa import RobustQAConfig

    helps = {
        "held_out": "domain kept out of training (trivia, computing, ai, emotion, chitchat)",
        "num_candidates": "answers to choose from per question",
        "steps": "optimizer steps per model",
        "batch_questions": "questions per step (in-batch negatives)",
        "layers": "MiniLM blocks whose FFN becomes a Switch layer",
        "noise": "copy-init noise (fraction of each weight's std)",
        "train_only_moe": "freeze all but the routers and experts in the MoE model",
        "eda_prob": "probability that a training question / gold answer is EDA-augmented (0 = off)",
        "threads": "torch threads (0 = torch default)",
    }
    for f in fields(RobustQAConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=helps.get(f.name))
        elif f.name == "layers":
            parser.add_argument(flag, type=int, nargs="+", default=list(f.default), help=helps[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type
            kind = {"steps": positive_int, "threads": nonnegative_int}.get(f.name, kind)
            parser.add_argument(flag, type=kind, default=f.default, help=(helps.get(f.name, "") + f" (default {f.default})"))
    parser.add_argument("--out", type=out_file, default=None, help="write the results as JSON to this file")


def config_from_args(args):
    from dataclasses import fields

    from ..recipes.robust_qa import RobustQAConfig

    kw = {f.name: getattr(args, f.name) for f in fields(RobustQAConfig)}
    kw["layers"] = tuple(kw["layers"])
    return RobustQAConfig(**kw)


def run(args) -> int:
    from ..recipes.robust_qa import run_recipe, save_json

    out = run_recipe(config_from_args(args))
    if args.out:
        save_json(out, args.out)
        print(f"results written to {args.out}")
    return 0
