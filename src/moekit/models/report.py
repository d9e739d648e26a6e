"""Demo report: the summary table as text and markdown, and the plots (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def quality_rows(summary: dict) -> list[list[str]]:
    q = summary["quality"]
    rows = []
    for task in summary["tasks"]:
        metrics = ["accuracy", "miou"] if task["kind"] == "segment" else ["accuracy"]
        for m in metrics:
            label = {"accuracy": "pixel acc" if task["kind"] == "segment" else "accuracy", "miou": "mIoU"}[m]
            rows.append([task["name"], label] + [_fmt(q[model].get(task["name"], {}).get(m)) for model in q])
    return rows


def cost_rows(summary: dict) -> list[list[str]]:
    rows = []
    for r in summary["cost"]:
        rows.append([r["what"], f"{r['flops'] / 1e6:.2f}", f"{r['expert_flops'] / 1e6:.2f}", f"{r['params'] / 1e3:.1f}",
                     f"{r['latency_s'] * 1e3:.3f}" if r.get("latency_s") is not None else "-"])
    return rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    out = ["| " + " | ".join(header) + " |", rule]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


QUALITY_HEADER_BASE = ["task", "metric"]
COST_HEADER = ["per image", "MFLOPs", "expert MFLOPs", "params (k)", "latency (ms)"]


def quality_header(summary: dict) -> list[str]:
    return QUALITY_HEADER_BASE + list(summary["quality"])


def render_text(summary: dict) -> str:
    quality = text_table(quality_header(summary), quality_rows(summary))
    return "\n".join([quality, "", text_table(COST_HEADER, cost_rows(summary))])


def render_markdown(summary: dict) -> str:
    lines = [
        "# moekit demo report",
        "",
        summary["description"],
        "",
        "## Quality on the test set",
        "",
        markdown_table(quality_header(summary), quality_rows(summary)),
        "",
        "## Cost per image",
        "",
        markdown_table(COST_HEADER, cost_rows(summary)),
        "",
        "FLOPs count matrix products (2 per multiply-add) from the configuration; latency is the median wall time "
        "per image over batches of the test set on this machine.",
        "",
        "## Single-task pathways",
        "",
        markdown_table(
            ["task", "experts kept per MoE layer", "params (k)", "of full model", "expert params kept",
             "agreement with full model", "max |logit diff|"],
            [[p["task"], str(p["experts_kept"]), f"{p['params'] / 1e3:.1f}", f"{p['params_fraction']:.1%}",
              f"{p['expert_params_fraction']:.1%}", f"{p['agreement']:.4f}", f"{p['max_abs_logit_diff']:.2e}"]
             for p in summary["pathways"]],
        ),
        "",
        "## Edge-MoE approximations",
        "",
        summary["approx_note"],
        "",
        "## Training",
        "",
        markdown_table(["model", "steps", "train wall s", "train CPU s", "final losses"],
                       [[m, str(v["steps"]), f"{v['seconds']:.1f}", f"{v.get('cpu_seconds', float('nan')):.1f}",
                         ", ".join(f"{k}={x:.3f}" for k, x in v["final_losses"].items())]
                        for m, v in summary["training"].items()]),
        "",
        "![expert usage](expert_usage.png)",
        "",
        "![training curves](training_curves.png)",
        "",
        f"Machine: {summary['machine']}. Wall time of the whole demo: {summary['wall_seconds']:.1f} s "
        f"(CPU time of all its processes: {summary.get('cpu_seconds', float('nan')):.1f} s).",
        "",
    ]
    return "\n".join(lines)


def plot_expert_usage(usage: dict, path: Path) -> None:
    """``usage[task] = (L, E) fractions``: one heatmap per MoE layer, tasks as rows, experts as columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(usage)
    L = len(next(iter(usage.values())))
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 0.6 * len(tasks) + 1.6), squeeze=False)
    for layer in range(L):
        ax = axes[0][layer]
        data = [list(usage[t][layer]) for t in tasks]
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xticks(range(len(data[0])))
        ax.set_xlabel("expert")
        ax.set_title(f"MoE layer {layer}")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of routed pairs")
    fig.suptitle("Expert usage per task and layer (test set)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(histories: dict, path: Path) -> None:
    """``histories[model] = list of step records`` with ``loss/<task>`` keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k.split("/", 1)[1] for h in histories.values() for r in h for k in r if k.startswith("loss/")})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[0][i]
        for model, hist in histories.items():
            ys = [r[f"loss/{task}"] for r in hist]
            w = max(1, len(ys) // 30)
            smooth = [sum(ys[max(0, j - w + 1):j + 1]) / len(ys[max(0, j - w + 1):j + 1]) for j in range(len(ys))]
            ax.plot(range(1, len(ys) + 1), smooth, label=model)
        ax.set_title(f"train loss: {task}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
