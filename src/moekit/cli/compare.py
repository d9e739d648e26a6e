"""``moekit compare``: train the same small models with several routers for a fixed step budget and write a table
(markdown + JSON) and a plot. Data ships with installed packages (Python stdlib sources; scikit-learn digits)."""

from __future__ import annotations

from ._validate import out_dir, positive_int


def add_arguments(parser) -> None:
    parser.add_argument("--task", choices=("all", "lm", "digits"), default="all",
                        help="lm: byte-level LM over routers; digits: SMEAR vs tag vs estimators (default: both)")
    parser.add_argument("--routers", default=None,
                        help="comma-separated LM runs (preset or registered router names; default: all runnable)")
    parser.add_argument("--smear", default=None,
                        help="comma-separated digits runs (default: all: smear,tag,top1,st_gumbel,reinforce,...)")
    parser.add_argument("--steps", type=positive_int, default=None, help="LM training steps (default 300; --quick 4)")
    parser.add_argument("--digits-steps", type=positive_int, default=None, help="digits training steps (default 1500; --quick 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads (default 1: on a shared CPU more threads can be many times slower)")
    parser.add_argument("--out", type=out_dir, default="compare-results", help="output folder (compare.md, compare.json, compare.png)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: small models, a few steps")
    parser.add_argument("--list", action="store_true", help="list the runnable configurations and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import dataclasses
    from pathlib import Path

    import torch

    from moekit.compare import DIGITS_PRESETS, DigitsConfig, LMConfig, lm_choices, train_digits, train_lm
    from moekit.compare.data import digits_domains, text_data
    from moekit.compare.report import markdown_table, write_report

    lm_runnable, skipped = lm_choices()
    if args.list:
        print("LM runs:")
        for name, p in lm_runnable.items():
            print(f"  {name:16s} {p.note}")
        for name, why in skipped.items():
            print(f"  {name:16s} (skipped: {why})")
        print("digits runs:")
        for name, p in DIGITS_PRESETS.items():
            print(f"  {name:16s} {p.note}")
        return 0

    def pick(spec: str | None, available: dict, what: str) -> list[str]:
        if spec is None:
            return list(available)
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise SystemExit(f"moekit compare: unknown {what} {unknown}; valid: {', '.join(available)}")
        return names

    torch.set_num_threads(args.threads)
    do_lm, do_digits = args.task in ("all", "lm"), args.task in ("all", "digits")
    lm_names = pick(args.routers, lm_runnable, "LM run") if do_lm else []
    digit_names = pick(args.smear, DIGITS_PRESETS, "digits run") if do_digits else []

    lm_cfg = LMConfig(seed=args.seed)
    dg_cfg = DigitsConfig(seed=args.seed)
    if args.quick:
        lm_cfg = dataclasses.replace(lm_cfg, dim=16, heads=2, seq=16, batch=4, expert_hidden=16, steps=4, warmup=2,
                                     eval_batches=1, log_every=2)
        dg_cfg = dataclasses.replace(dg_cfg, dim=16, expert_hidden=4, steps=6, batch=32, eval_every=3)
    if args.steps is not None:
        lm_cfg = dataclasses.replace(lm_cfg, steps=args.steps)
    if args.digits_steps is not None:
        dg_cfg = dataclasses.replace(dg_cfg, steps=args.digits_steps)

    total = len(lm_names) * lm_cfg.steps + len(digit_names) * dg_cfg.steps
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        except ImportError:  # pragma: no cover - optional dependency
            bar = None
    tick = (lambda: bar.update(1)) if bar is not None else (lambda: None)

    results = []
    if lm_names:
        data = text_data(200_000 if args.quick else 2_000_000)
        for name in lm_names:
            if bar is not None:
                bar.set_description(f"lm {name}")
            results.append(train_lm(lm_runnable[name], lm_cfg, data, tick))
    if digit_names:
        dd = digits_domains(seed=args.seed)
        for name in digit_names:
            if bar is not None:
                bar.set_description(f"digits {name}")
            results.append(train_digits(DIGITS_PRESETS[name], dg_cfg, dd, tick))
    if bar is not None:
        bar.close()

    config = {"lm": dataclasses.asdict(lm_cfg) if lm_names else None,
              "digits": dataclasses.asdict(dg_cfg) if digit_names else None,
              "quick": args.quick, "threads": args.threads}
    paths = write_report(results, Path(args.out), config, {k: v for k, v in skipped.items() if do_lm})
    for task in ("lm", "digits"):
        table = markdown_table(results, task)
        if table:
            print(f"\n{task}:\n{table}")
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
