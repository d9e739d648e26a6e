"""The named configurations ``moekit compare`` can train.

Language-model runs (``LM_PRESETS``) name a router spec and balance policies by their *registered* names, so a
router added to ``moekit.spec.SPECS`` later is picked up: a registered router without a preset here runs with its
default spec and the Switch loss (coefficient 0.01). Routers that need task ids cannot run on the LM and are
listed as skipped. Digits runs (``DIGITS_PRESETS``) are SMEAR routings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..spec import SPECS, spec_from_dict


def _task_conditioned(router: str) -> bool:
    """Does the registered router read task ids (the LM has no tasks)? The spec declares it."""
    return bool(SPECS.get(f"router:{router}").task_conditioned)


@dataclass(frozen=True)
class LMPreset:
    name: str
    router: str | None  # registered router name; None = dense FFN
    router_kw: dict = field(default_factory=dict)
    balance: tuple = ()  # ((registered balance name, kwargs), ...)
    experts: tuple | None = None  # (registered experts name, kwargs); None = MLP(gelu) experts of the config size
    hidden_mult: float = 1.0  # FFN hidden size as a multiple of the expert hidden size
    note: str = ""

    def router_spec(self) -> Any:
        return None if self.router is None else spec_from_dict("router", {"type": self.router, **self.router_kw})

    def balance_specs(self) -> tuple:
        return tuple(spec_from_dict("balance", {"type": n, **kw}) for n, kw in self.balance)


SWITCH = (("switch", {"coef": 0.01}),)

LM_PRESETS: dict[str, LMPreset] = {
    p.name: p
    for p in [
        LMPreset("dense", None, hidden_mult=2.0, note="one dense FFN with the active size of top-2"),
        LMPreset("top1", "topk", {"k": 1}, SWITCH, note="Switch: top-1 + LB loss"),
        LMPreset("top2", "topk", {"k": 2}, SWITCH, note="top-2 renormalised + LB loss 0.01"),
        LMPreset("top2_noloss", "topk", {"k": 2}, (), note="top-2, no balance loss (control for aux-free)"),
        LMPreset("top2_auxfree", "topk", {"k": 2}, (("aux_free", {"rate": 1e-3}),),
                 note="top-2, aux-loss-free bias (gamma 1e-3), no balance loss"),
        LMPreset("top_p", "top_p", {"threshold": 0.4}, SWITCH + (("entropy", {"coef": 1e-4}),),
                 note="dynamic top-p, p=0.4, LB 0.01 + entropy 1e-4"),
        LMPreset("expert_choice", "expert_choice", {"capacity_factor": 2.0}, (),
                 note="expert choice c=2 (not causal: sees the whole batch)"),
        LMPreset("moepp", "moepp", {"k": 2}, (("hetero_balance", {"coef": 0.01, "tau": 0.75}),),
                 note="8 FFN + 2 const/1 copy/1 zero, gating residuals, hetero LB"),
        LMPreset("adamoe", "adamoe", {"k": 4, "num_null": 4}, SWITCH,
                 note="8 true + 4 null experts, top-4, LB over all 12"),
        LMPreset("hmoe", "top_p", {"threshold": 0.4},
                 (("size_penalty", {"coef": 0.01}), ("entropy", {"coef": 1e-4})),
                 experts=("hetero", {"hidden_mults": (0.25, 0.5, 0.75, 1.0, 1.0, 1.25, 1.5, 1.75)}),
                 note="HMoE: sizes 0.25F..1.75F (total 8F), top-p 0.4, P-penalty 0.01 + entropy"),
        LMPreset("aoe", "aoe", {"k": 2}, SWITCH, experts=("aoe", {"rank": 16}),
                 note="Autonomy-of-Experts, rank-16 gate factor (3-matrix experts), LB 0.01"),
        LMPreset("hash", "hash", {"vocab_size": 256}, (), note="balanced random hash of the input byte, 1 expert"),
        LMPreset("thor", "thor", {}, (), note="random expert per call, 2 passes + symmetric KL (alpha 1)"),
        LMPreset("smoe_dropout", "smoe_dropout", {"k_min": 4, "k_max": 8}, (),
                 note="frozen random router, k 4->8 over training (paper: E/2 -> E), eval k=8"),
    ]
}


@dataclass(frozen=True)
class DigitsPreset:
    name: str
    routing: str
    single: bool = False  # one expert (E=1)
    wide: bool = False  # one adapter with E times the hidden units (the "1x params" baseline)
    expert_dropout: bool = False  # use the configured rate (authors: SMEAR and Top-k on DomainNet)
    note: str = ""


DIGITS_PRESETS: dict[str, DigitsPreset] = {
    p.name: p
    for p in [
        DigitsPreset("smear", "smear", expert_dropout=True, note="merge experts by router weights"),
        DigitsPreset("tag", "tag", note="expert = domain id"),
        DigitsPreset("top1", "top1", expert_dropout=True, note="argmax, output scaled by p"),
        DigitsPreset("st_gumbel", "st_gumbel", note="straight-through Gumbel, tau 10 -> 0.5"),
        DigitsPreset("reinforce", "reinforce", note="REINFORCE + learned baseline"),
        DigitsPreset("ensemble", "ensemble", note="all experts, weighted (E x compute)"),
        DigitsPreset("single", "tag", single=True, note="one adapter (1x compute)"),
        DigitsPreset("single_wide", "tag", single=True, wide=True, note="one adapter with E x hidden (1x params)"),
    ]
}


def registered_routers() -> list[str]:
    return [n.split(":", 1)[1] for n in SPECS.names() if n.startswith("router:")]


def lm_choices() -> tuple[dict[str, LMPreset], dict[str, str]]:
    """(runnable LM presets by name, skipped name -> reason): the presets whose router is registered, plus one
    default preset per other registered router."""
    routers = set(registered_routers())
    runnable: dict[str, LMPreset] = {}
    skipped: dict[str, str] = {}
    covered = set()
    for p in LM_PRESETS.values():
        if p.router is None or p.router in routers:
            runnable[p.name] = p
            covered.add(p.router)
        else:
            skipped[p.name] = f"router {p.router!r} is not registered in this install"
    for r in sorted(routers - covered):
        if _task_conditioned(r):
            skipped[r] = "needs task ids (the LM task has none)"
            continue
        preset = LMPreset(r, r, {}, SWITCH, note="registered router, default spec + LB 0.01")
        problem = _default_build_problem(preset)
        if problem is None:
            runnable[r] = preset
        else:
            skipped[r] = f"its default spec does not build a layer here: {problem}"
    return runnable, skipped


def _default_build_problem(preset: LMPreset) -> str | None:
    """None if the preset's router builds and routes a small MoE layer, else the error (a router that needs
    arguments, task ids or special experts cannot run as a generic preset)."""
    import torch

    from ..layer import MoE

    try:
        layer = MoE(8, 4, router=preset.router_spec(), balance=preset.balance_specs())
        layer(torch.randn(2, 3, 8))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run generically"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None
