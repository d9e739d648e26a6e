"""Tables (markdown + JSON) and a plot of ``moekit compare`` results."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from .runner import RunResult

_COLS = [
    ("name", "run", "{}"),
    ("loss", "loss", "{:.4f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("ffn_mflops_per_token", "routed-layer MFLOPs/token", "{:.3f}"),
    ("experts_per_token", "experts/token", "{:.2f}"),
    ("max_over_mean", "max/mean load", "{:.2f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("cpu_s", "CPU s", "{:.1f}"),
    ("note", "setup", "{}"),
]


def markdown_table(results: list[RunResult], task: str) -> str:
    rows = [r for r in results if r.task == task]
    if not rows:
        return ""
    cols = [c for c in _COLS if not (c[0] == "accuracy" and task == "lm")]
    if task == "digits":
        cols = cols[:-1] + [("nmi", "routing-domain NMI", "{:.2f}"), cols[-1]]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for key, _, fmt in cols:
            v = r.extra.get("routing_domain_nmi") if key == "nmi" else getattr(r, key)
            vals.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}


def write_report(results: list[RunResult], out_dir: Path, config: dict, skipped: dict[str, str]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    titles = {"lm": "Byte-level LM on the Python standard library (validation loss, nats/byte)",
              "digits": "Digits in 6 domains: SMEAR vs tag routing vs gradient estimators (test set)"}
    md = ["# moekit compare", "", (f"torch {env['torch']}, {env['threads']} threads, {env['processor']}; "
                                   "a shared CPU, so wall times are rough."), ""]
    for task in ("lm", "digits"):
        table = markdown_table(results, task)
        if table:
            md += [f"## {titles[task]}", "", table, ""]
    if skipped:
        md += ["Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()), ""]
    paths = {"markdown": out_dir / "compare.md", "json": out_dir / "compare.json"}
    paths["markdown"].write_text("\n".join(md))
    paths["json"].write_text(json.dumps(
        {"environment": env, "config": config, "skipped": skipped, "results": [r.as_dict() for r in results]},
        indent=1))
    plot = _plot(results, out_dir / "compare.png")
    if plot is not None:
        paths["plot"] = plot
    return paths


def _plot(results: list[RunResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional dependency
        return None
    tasks = [t for t in ("lm", "digits") if any(r.task == t for r in results)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        rows = [r for r in results if r.task == task]
        for r in rows:
            if r.curve:
                s, v = zip(*r.curve)
                row[0].plot(s, v, label=r.name)
        if task == "lm":  # zoom on the part of training where the runs differ
            lows = [v for r in rows for _, v in r.curve]
            if lows:
                row[0].set_ylim(min(lows) - 0.05, min(lows) + 0.8)
        row[0].set_xlabel("step")
        row[0].set_ylabel("train loss" if task == "lm" else "test accuracy")
        row[0].set_title("LM training loss" if task == "lm" else "digits test accuracy")
        row[0].legend(fontsize=7)
        ys = [r.loss if task == "lm" else r.accuracy for r in rows]
        xs = [r.ffn_mflops_per_token for r in rows]
        row[1].scatter(xs, ys)
        for r, x, y in zip(rows, xs, ys):
            row[1].annotate(f"{r.name} ({r.experts_per_token:.2f} e/t, load {r.max_over_mean:.2f})", (x, y), fontsize=7)
        row[1].set_xlabel("routed-layer MFLOPs per token (forward)")
        row[1].set_ylabel("validation loss" if task == "lm" else "test accuracy")
        row[1].set_title("quality vs active compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
