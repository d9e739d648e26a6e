"""Plots and tables of a ``moekit train-lm`` report folder (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(xs: list[float], w: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_losses(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Training loss (moving average of 20 steps) of each run against tokens seen."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, m in runs.items():
        n = len(m["loss"])
        per = m["tokens"] / max(n, 1)
        ax.plot([per * (i + 1) for i in range(n)], smooth(m["loss"]), label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("train loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_usage(usage: list[dict[str, list[float]]], path: Path) -> None:
    """Heat maps, one per MoE layer: rows are domains, columns experts, colour the share of the domain's routed
    tokens that each expert receives."""
    plt = _plt()
    L = len(usage)
    fig, axes = plt.subplots(1, L, figsize=(2.6 * L + 1, 2.4), squeeze=False)
    vmax = max(max(r) for layer in usage for r in layer.values())  # one colour scale for every layer
    for j, ax in enumerate(axes[0]):
        doms = list(usage[j])
        mat = [usage[j][d] for d in doms]
        im = ax.imshow(mat, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(doms)), doms if j == 0 else [""] * len(doms))
        ax.set_xticks(range(len(mat[0])))
        ax.set_xlabel("expert")
        ax.set_title(f"layer {j}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of routed tokens")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    doms = list(next(iter(runs.values()))["final"]["ppl"])
    head = ("| model | params total / active | steps | tokens | tokens/s | CPU s | wall s | "
            + " | ".join(f"val ppl {d}" for d in doms) + " |")
    lines = [head, "|---" * (7 + len(doms)) + "|"]
    for name, m in runs.items():
        p = m["params"]
        lines.append(f"| {name} | {p['total'] / 1e6:.2f}M / {p['active'] / 1e6:.2f}M | {m['step']} | {m['tokens']:,} | "
                     f"{m['tokens_per_second']:.0f} | {m['cpu_seconds']:.0f} | {m['wall_seconds']:.0f} | "
                     + " | ".join(f"{m['final']['ppl'][d]:.2f}" for d in doms) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(summary: dict[str, Any], path: Path) -> None:
    """Validation perplexity per domain of each router: mean over seeds with the 95% CI as error bars, seeds as
    dots."""
    plt = _plt()
    names = list(summary)
    doms = list(next(iter(summary.values())))
    fig, axes = plt.subplots(1, len(doms), figsize=(2.6 * len(doms) + 0.6, 3.0), squeeze=False)
    for ax, d in zip(axes[0], doms):
        for i, n in enumerate(names):
            c = summary[n][d]
            ci = c["ci95"] if c["ci95"] == c["ci95"] else 0.0
            ax.errorbar([i], [c["mean"]], yerr=[ci], fmt="o", capsize=3)
            ax.scatter([i] * len(c["values"]), c["values"], s=8, color="grey", zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"val ppl {d}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
