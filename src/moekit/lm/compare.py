"""Router comparison on the real-text LM (``moekit train-lm --compare``): the same Qwen3-MoE-shaped model trained
with several routers and seeds; validation perplexity per domain with t-based 95% confidence intervals over seeds,
and Welch t-tests of each router against the baseline (``top2``).

Active compute is matched where the router allows it: every run has E experts of the same size and k=2 or an
average of 2 experts per token (expert choice with capacity factor 2; top-p's count is measured and reported; MoE++
spends part of its choices on compute-free experts, so it uses *less*).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..spec import spec_from_dict

# name -> (router spec dict, balance spec dicts, note)
ROUTERS: dict[str, tuple[dict, tuple, str]] = {
    "top2": ({"type": "topk", "k": 2, "fp32": False, "score_dtype": "float32"},
             ({"type": "switch", "coef": 0.01},), "top-2 softmax, renormalised + Switch LB loss 0.01 (exports)"),
    "top2_auxfree": ({"type": "topk", "k": 2}, ({"type": "aux_free", "rate": 1e-3},),
                     "top-2 + auxiliary-loss-free selection bias (rate 1e-3)"),
    "expert_choice": ({"type": "expert_choice", "capacity_factor": 2.0}, (),
                      "expert choice, capacity factor 2 (not causal: experts see the whole batch)"),
    "moepp": ({"type": "moepp", "k": 2, "gating_residual": True},
              ({"type": "hetero_balance", "coef": 0.01, "tau": 0.75},),
              "MoE++: FFN + zero/copy/constant experts, top-2, gating residuals, heterogeneous LB"),
    "top_p": ({"type": "top_p", "threshold": 0.4},
              ({"type": "switch", "coef": 0.01}, {"type": "entropy", "coef": 1e-4}),
              "dynamic top-p (p=0.4) + LB 0.01 + entropy 1e-4"),
}


def router_specs(name: str) -> tuple[Any, tuple]:
    if name not in ROUTERS:
        raise ValueError(f"train-lm --compare: unknown router {name!r}; valid: {', '.join(ROUTERS)}")
    r, b, _ = ROUTERS[name]
    return spec_from_dict("router", dict(r)), tuple(spec_from_dict("balance", dict(x)) for x in b)


# two-sided 97.5% quantiles of Student's t for small degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t confidence interval (nan with one value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    t = _T975.get(len(xs) - 1, 1.96)
    return m, t * statistics.stdev(xs) / math.sqrt(len(xs))


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test (the Student t tail is integrated numerically from its density, so no
    scipy is needed)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return 0.0 if statistics.fmean(a) != statistics.fmean(b) else 1.0
    t = abs(statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2.0 * _t_tail(t, df)


def _t_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom, by Simpson integration of the density on [0, t]."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)
    n = 2000
    h = t / n
    s = f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    return max(0.0, 0.5 - s * h / 3)


def summarize(results: dict[str, list[dict[str, float]]], baseline: str = "top2") -> dict[str, Any]:
    """``results[router] = [per-seed {domain: ppl}]`` -> mean, CI and p-value vs ``baseline`` per domain."""
    domains = list(next(iter(results.values()))[0])
    out: dict[str, Any] = {}
    for name, runs in results.items():
        row = {}
        for d in domains + ["mean"]:
            xs = [r[d] if d != "mean" else statistics.fmean(r[x] for x in domains) for r in runs]
            m, ci = mean_ci(xs)
            row[d] = {"mean": m, "ci95": ci, "values": xs}
            if name != baseline and baseline in results:
                base = [r[d] if d != "mean" else statistics.fmean(r[x] for x in domains) for r in results[baseline]]
                row[d]["p_vs_baseline"] = welch_p(xs, base)
        out[name] = row
    return out


def markdown(summary: dict[str, Any], extra: dict[str, dict[str, float]] | None = None) -> str:
    domains = [d for d in next(iter(summary.values())) if d != "mean"] + ["mean"]
    lines = ["| router | " + " | ".join(f"val ppl {d} (95% CI)" for d in domains) + " | experts/token |",
             "|---" * (len(domains) + 2) + "|"]
    for name, row in summary.items():
        cells = []
        for d in domains:
            c = row[d]
            p = c.get("p_vs_baseline")
            star = "" if p is None or not p < 0.05 else " *"
            cells.append(f"{c['mean']:.2f} ± {c['ci95']:.2f}{star}")
        ept = (extra or {}).get(name, {}).get("experts_per_token", float("nan"))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ept:.2f} |")
    lines.append("")
    lines.append("`*`: differs from top2 at p < 0.05 (Welch t-test over seeds, no multiple-comparison correction).")
    others = [n for n in summary if "p_vs_baseline" in summary[n][domains[0]]]
    if others:
        holm = holm_reject({(n, d): summary[n][d]["p_vs_baseline"] for n in others for d in domains})
        lines += ["", "| router vs top2 | " + " | ".join(f"p {d}" for d in domains) + " |",
                  "|---" * (len(domains) + 1) + "|"]
        for n in others:
            cells = []
            for d in domains:
                c = summary[n][d]
                diff = c["mean"] - summary["top2"][d]["mean"] if "top2" in summary else float("nan")
                cells.append(f"{c['p_vs_baseline']:.3f} ({diff:+.2f}){' **' if holm[(n, d)] else ''}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"Welch p-value (difference of the means vs top2); `**`: still significant at 0.05 after a Holm "
                     f"correction over all {len(holm)} comparisons of this table.")
    return "\n".join(lines) + "\n"


def holm_reject(pvalues: dict[Any, float], alpha: float = 0.05) -> dict[Any, bool]:
    """Holm-Bonferroni step-down: which hypotheses are rejected at family-wise level ``alpha`` (nan: never)."""
    order = sorted(pvalues, key=lambda key: (math.isnan(pvalues[key]), pvalues[key]))
    m = len(order)
    out = {key: False for key in pvalues}
    for i, key in enumerate(order):
        p = pvalues[key]
        if math.isnan(p) or p > alpha / (m - i):
            break
        out[key] = True
    return out
