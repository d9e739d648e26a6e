"""A stand-in for an HF experts module that carries only the experts a forward call touches.

Experts implementation functions (transformers' eager / grouped_mm, moekit's) read attributes of the module they
are given: the stacked weights, ``num_experts``, the layout flags, ``act_fn``, ``_apply_gate``... The proxy answers
the weight names and ``num_experts`` with the compact tensors of the touched experts and forwards every other
attribute to the real (weightless) module, so any implementation runs unchanged on the subset.
"""

from __future__ import annotations

import torch


class ExpertsProxy:
    def __init__(self, template: torch.nn.Module, weights: dict[str, torch.Tensor], num_experts: int):
        d = self.__dict__
        d["_template"] = template
        d["num_experts"] = num_experts
        d["_is_expert_parallel"] = False
        d.update(weights)

    def __getattr__(self, name):  # only called when normal lookup fails: fall back to the real module
        return getattr(self.__dict__["_template"], name)

    def __setattr__(self, name, value):
        self.__dict__[name] = value


def resolve_inner(inner, module: torch.nn.Module) -> tuple[object, bool]:
    """The experts implementation function to run on proxies: a callable ``f(module, x, idx, w)``, or a name:
    ``"eager"`` (the class's own undecorated forward), any name registered in transformers' ``ExpertsInterface``
    (``"grouped_mm"``, ``"batched_mm"``, ``"moekit"`` = :func:`moekit.convert.hf_experts.moekit_experts_forward`),
    or ``"auto"`` (= ``"eager"``: it indexes ``weights[e]``, so the cached per-expert tensors serve it in one call
    with no copy; the stacked-weight implementations are called once per touched expert on a one-expert view).
    Also returns whether the function only indexes ``weights[e]`` (eager)."""
    if callable(inner):
        return inner, False
    if inner == "moekit":
        from moekit.convert.hf_experts import moekit_experts_forward

        return moekit_experts_forward, False
    if inner in ("auto", "eager"):
        fwd = type(module).forward
        return getattr(fwd, "__wrapped__", fwd), True
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if inner not in ALL_EXPERTS_FUNCTIONS:
        raise ValueError(f"inner={inner!r}: expected 'auto', 'eager', a callable, or one of the registered experts "
                         f"implementations {sorted(ALL_EXPERTS_FUNCTIONS.keys())}")
    return ALL_EXPERTS_FUNCTIONS[inner], False
