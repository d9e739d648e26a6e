"""moekit as a transformers *experts implementation*: ``experts_implementation="moekit"``.

transformers (>= 5) decorates the expert bank of most MoE architectures with ``@use_experts_implementation``: the
class keeps its weights as 3-D tensors and its ``forward(hidden_states, top_k_index, top_k_weights)`` is looked up at
call time in ``ExpertsInterface`` under ``config._experts_implementation`` ("eager", "grouped_mm", ...). This module
adds a ``"moekit"`` entry that runs moekit's sort-based grouped dispatch (one stable sort of the (token, expert)
pairs, gathers whose backward is a gather, grouped GEMMs, a weighted un-permute) on the HF module's *own* weights:
nothing is copied or converted, checkpoints and the router stay HF's.

Registration: :func:`register_hf` registers explicitly. ``import moekit.convert`` also arranges it without importing
transformers: if ``transformers.integrations.moe`` is already imported it registers at once, otherwise a one-shot
import hook registers the moment transformers imports it (before any model can validate its
``experts_implementation``). So ``import moekit.convert`` then ``from_config(cfg, experts_implementation="moekit")``
works in either import order.

The contract of :func:`moekit_experts_forward` (the "offload" helper calls it with a proxy holding a subset of
experts): it reads only these attributes of ``experts_module``:

==========================  ============================================================================================
attribute                   meaning
==========================  ============================================================================================
``has_gate``                bool. True: ``gate_up_proj`` holds gate and up; False: ``up_proj`` holds the up projection
``is_transposed``           bool. False: weights are ``(E, out, in)`` (``nn.Linear``); True: ``(E, in, out)``
``is_concatenated``         bool. True: gate/up halves are ``[gate; up]``; False: interleaved ``[g0, u0, g1, u1, ...]``
                            (only consulted with the default gate; an overridden ``_apply_gate`` splits by itself)
``has_bias``                bool. True: ``gate_up_proj_bias`` (or ``up_proj_bias``) ``(E, 2F)`` and ``down_proj_bias``
                            ``(E, D)`` are read
``has_post_expert_norm``    bool. True: ``post_expert_norm`` (a module, applied per pair before weighting) is read
``_is_expert_parallel``     bool (default False). True: expert ids outside ``[0, E)`` are sentinels and contribute zero
``gate_up_proj`` /          the weights; ``E`` (the number of local experts) is their first dimension, and
``up_proj``, ``down_proj``  ``top_k_index`` indexes it
``_apply_gate``             the gating callable ``(pairs, 2F) -> (pairs, F)`` when ``has_gate``. transformers installs a
                            default (``act_fn(gate) * up``) that this function recognises and runs itself (reading
                            ``act_fn``); an override (gpt-oss's clamped SwiGLU with ``alpha``/``limit``, the clamped
                            SwiGLUs of DeepSeek-V4 / Hunyuan-V4 / GLM-5, float32 SwiGLU of Beam, ...) is called as is,
                            so its own attributes must be reachable from it (a bound method of the real module works)
``act_fn``                  the activation, when ``has_gate`` is False or the gate is transformers' default
==========================  ============================================================================================

Any other layout flag declared by the installed ``use_experts_implementation`` decorator that this module does not know
(checked by :func:`register_hf`) makes the forward raise when a module sets it to a non-default value, naming the
class and the flag: a model is never run with a layout moekit does not understand.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..assignment import Assignment
from ..dispatch.local import LocalDispatcher
from ..experts.bank import small_linear
from ..experts.glu_fn import FUSED, fused_glu, native_swiglu
from ..numerics import as_dtype
from ..ops import native
from ..ops.grouped import auto_impl, grouped_linear

NAME = "moekit"
_HF_MOE_MODULE = "transformers.integrations.moe"
# Layout flags of transformers' decorator that moekit_experts_forward implements (and the EP marker it handles).
KNOWN_FLAGS = frozenset({"is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm"})
# Flags of the installed decorator that moekit does not know, with their defaults (filled by register_hf).
_unknown_flags: dict[str, Any] = {}
_DISPATCHER = LocalDispatcher()  # stateless (no parameters, no buffers): safe to share


def _where(module: Any) -> str:
    return type(module).__qualname__


def _uses_default_gate(module: Any) -> bool:
    gate = getattr(type(module), "_apply_gate", None)
    return getattr(gate, "__module__", None) == _HF_MOE_MODULE and gate.__name__ == "_default_apply_gate"


def _check_layout(module: Any) -> None:
    for flag, default in _unknown_flags.items():
        value = getattr(module, flag, default)
        if value != default:
            raise NotImplementedError(
                f"moekit experts implementation: {_where(module)} sets the layout flag {flag}={value!r}, which "
                f"moekit does not implement (it knows {', '.join(sorted(KNOWN_FLAGS))}); use "
                f"experts_implementation='grouped_mm' for this model"
            )
    missing = [f for f in KNOWN_FLAGS if not hasattr(module, f)]
    if missing:
        raise TypeError(
            f"moekit experts implementation: {_where(module)} lacks the layout flag(s) {', '.join(sorted(missing))}; "
            "expected a module decorated with transformers' @use_experts_implementation (or a proxy that copies them)"
        )


def _weight(module: Any, name: str) -> Tensor:
    w = getattr(module, name, None)
    if not isinstance(w, Tensor) or w.dim() != 3:
        got = "missing" if w is None else (f"shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__)
        raise TypeError(
            f"moekit experts implementation: {_where(module)}.{name} must be a 3-D (experts, ., .) tensor; got {got}"
        )
    return w


def _bias(module: Any, name: str, E: int, width: int) -> Tensor:
    b = getattr(module, name, None)
    if not isinstance(b, Tensor) or tuple(b.shape) != (E, width):
        got = "missing" if b is None else (f"shape {tuple(b.shape)}" if isinstance(b, Tensor) else type(b).__name__)
        raise TypeError(
            f"moekit experts implementation: {_where(module)} declares has_bias=True but {name} is {got}; "
            f"expected a ({E}, {width}) tensor"
        )
    return b


def _as_EOI(w: Tensor, transposed: bool) -> Tensor:
    """The weight as ``(E, out, in)`` (a view: a transposed HF weight stays contiguous for grouped_mm)."""
    return w.transpose(-2, -1) if transposed else w


def _default_gate(module: Any, gate_up_N2F: Tensor) -> Tensor:
    if module.is_concatenated and gate_up_N2F.requires_grad and not torch.compiler.is_compiling():
        name = _ACT_NAMES.get(type(getattr(module, "act_fn", None)).__name__)
        if name in FUSED:  # training: the one-buffer backward of moekit's banks (moekit.experts.glu_fn)
            return fused_glu(gate_up_N2F, name)
    if module.is_concatenated:
        gate, up = gate_up_N2F.chunk(2, dim=-1)
    else:
        gate, up = gate_up_N2F[..., ::2], gate_up_N2F[..., 1::2]
    return module.act_fn(gate) * up


def _gate(m: Any, h_N: Tensor) -> Tensor:
    if not m.has_gate:
        return m.act_fn(h_N)
    form = _native_gating(m)
    if form is not None and form["activation"] == "silu":  # SwiGLU (plain or gpt-oss's): the native kernels
        if (y := native_swiglu(h_N, form["interleaved"], form.get("clamp"))) is not None:
            return y
    if _uses_default_gate(m):
        return _default_gate(m, h_N)
    return m._apply_gate(h_N)


# Decode path: at most this many (token, expert) pairs on CPU without autograd run one small GEMM pair per pair
# (no sort, no plan, no grouped kernel); generation's one-token steps are dominated by that fixed cost.
FEW_PAIRS = 16


def _kept_pairs(m: Any, idx_TK: Tensor, E: int, ep: bool) -> list[list[tuple[int, int]]]:
    """Per token, its (slot, expert) pairs with an expert in this module's weights; an id outside [0, E) is another
    rank's expert under expert parallelism (skipped) and an error otherwise."""
    out = []
    for experts in idx_TK.tolist():
        kept = []
        for j, e in enumerate(experts):
            if not 0 <= e < E:
                if ep:
                    continue  # another rank's expert
                raise ValueError(
                    f"moekit experts implementation ({_where(m)}): top_k_index holds expert id {e}, outside "
                    f"[0, {E}) (the experts in the weights), and the module is not marked expert-parallel"
                )
            kept.append((j, e))
        out.append(kept)
    return out


def _few_pairs_forward(m: Any, x_TD: Tensor, idx_TK: Tensor, w_TK: Tensor, w_up: Tensor, w_down: Tensor,
                       b_up: Tensor | None, b_down: Tensor | None) -> Tensor:
    """``sum_k w * expert(x)`` token by token, summed in float32 for half-precision inputs (as the grouped path).
    Per token: one input matmul per chosen expert, the gating once over the token's k rows, one output matmul per
    expert, and the weighted sum as one product (decode is bound by the number of ops per call)."""
    E = w_up.shape[0]
    acc = torch.float32 if x_TD.dtype in (torch.float16, torch.bfloat16) else x_TD.dtype
    ep = getattr(m, "_is_expert_parallel", False)
    if x_TD.dtype in native.DTYPES and native.takes_rows(x_TD):
        y = _few_pairs_native(m, x_TD, idx_TK, w_TK, w_up, w_down, b_up, b_down, ep)
        if y is not None:
            return y
    rows = []
    K = idx_TK.shape[1]
    for t, kept in enumerate(_kept_pairs(m, idx_TK, E, ep)):
        if not kept:
            rows.append(x_TD.new_zeros((1, w_down.shape[1]), dtype=acc))
            continue
        x_1D = x_TD[t:t + 1]
        h = [small_linear(x_1D, w_up[e], None if b_up is None else b_up[e]) for _, e in kept]
        g_KF = _gate(m, h[0] if len(h) == 1 else torch.cat(h))
        y = [small_linear(g_KF[i:i + 1], w_down[e], None if b_down is None else b_down[e])
             for i, (_, e) in enumerate(kept)]
        y_KD = y[0] if len(y) == 1 else torch.cat(y)
        if m.has_post_expert_norm:
            y_KD = m.post_expert_norm(y_KD)  # a norm over D: the same per row on the stacked rows
        w_K = w_TK[t] if len(kept) == K else w_TK[t, [j for j, _ in kept]]
        rows.append(torch.mm(as_dtype(w_K, acc).unsqueeze(0), as_dtype(y_KD, acc)))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _native_gating(m: Any) -> dict[str, Any] | None:
    """The module's gating as :func:`moekit.ops.native.ffn`'s keyword arguments, where the fused kernel has it:
    transformers' default gate (concatenated or interleaved) over an activation of ``native.ACTIVATIONS``, or
    gpt-oss's clamped SwiGLU (``_apply_gate`` defined by ``GptOssExperts``, read with the module's alpha and limit);
    None otherwise."""
    if not m.has_gate:
        return None
    if _uses_default_gate(m):
        act = _ACT_NAMES.get(type(getattr(m, "act_fn", None)).__name__)
        return None if act is None else {"glu": True, "activation": act, "interleaved": not m.is_concatenated}
    gate = getattr(type(m), "_apply_gate", None)
    if getattr(gate, "__qualname__", None) == "GptOssExperts._apply_gate" and float(m.limit) > 0:
        return {"glu": True, "activation": "silu", "interleaved": True, "clamp": (float(m.alpha), float(m.limit))}
    return None


# transformers' activation modules by class name -> moekit's activation names (fused and native forms)
_ACT_NAMES = {"SiLUActivation": "silu", "SiLU": "silu", "ReLU": "relu", "GELUTanh": "gelu_tanh"}


def _few_pairs_native(m: Any, x_TD: Tensor, idx_TK: Tensor, w_TK: Tensor, w_up: Tensor, w_down: Tensor,
                      b_up: Tensor | None, b_down: Tensor | None, ep: bool) -> Tensor | None:
    """The few-pairs path on moekit's native kernels (float32 or bfloat16 CPU, no autograd): every (token, expert)
    pair as a row, grouped by expert; the whole FFN in one kernel call where the gating has a native form
    (:func:`_native_gating`), else one call per projection around the module's own gating; the weighted sum
    per token as one product in float32. None where the kernels do not take these weights."""
    E = w_up.shape[0]
    T, K = idx_TK.shape
    groups: dict[int, list[int]] = {}
    token_P: list[int] = []
    slot_P: list[int] = []
    for t, kept in enumerate(_kept_pairs(m, idx_TK, E, ep)):
        for j, e in kept:
            groups.setdefault(e, []).append(len(token_P))
            token_P.append(t)
            slot_P.append(t * K + j)
    P = len(token_P)
    if P == 0:
        return x_TD.new_zeros((T, w_down.shape[1]))
    dtype = x_TD.dtype
    if not (native.takes_weight(w_up, b_up, dtype) and native.takes_weight(w_down, b_down, dtype)):
        return None
    experts = list(groups)
    offsets, rows = [0], []
    for e in experts:
        rows += groups[e]
        offsets.append(len(rows))
    x_PD = x_TD.expand(P, -1) if T == 1 else x_TD[token_P]
    gating = _native_gating(m)
    if gating is not None:
        y_PD = native.ffn(x_PD, w_up, b_up, w_down, b_down, experts=experts, offsets=offsets, rows=rows, **gating)
    else:
        g_PF = _gate(m, native.grouped_rows(x_PD, w_up, b_up, experts, offsets, rows))
        y_PD = native.grouped_rows(g_PF if native.takes_rows(g_PF) else g_PF.contiguous(), w_down, b_down, experts,
                                   offsets, rows)
    if m.has_post_expert_norm:
        y_PD = m.post_expert_norm(y_PD)  # a norm over D: the same per row
    y_PD = as_dtype(y_PD, torch.float32)  # the weighted sum in float32 (as the torch path, for bfloat16 too)
    if T == 1:  # the combine as one product: weights (1, P) @ rows (P, D)
        w_1P = w_TK if P == K else w_TK.reshape(-1)[slot_P].unsqueeze(0)
        return torch.mm(as_dtype(w_1P, torch.float32), y_PD)
    w_TP = y_PD.new_zeros((T, P))
    w_TP[token_P, list(range(P))] = w_TK.reshape(-1)[slot_P].to(torch.float32)
    return torch.mm(w_TP, y_PD)


def moekit_experts_forward(
    experts_module: Any, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The experts' combined output ``(T, D)`` for ``hidden_states (T, D)`` routed to ``top_k_index (T, K)`` with
    combine weights ``top_k_weights (T, K)``: ``sum_k w[t, k] * expert_{idx[t, k]}(x[t])``.

    Signature and semantics are those of transformers' experts implementations (``grouped_mm_experts_forward``).
    Reads only the attributes listed in the module docstring. Differentiable in ``hidden_states``,
    ``top_k_weights`` and every weight. Works for any float dtype (float64 and unaligned shapes take moekit's
    per-expert loop, float32/bfloat16 ``torch.nn.functional.grouped_mm``).
    """
    _check_layout(experts_module)
    m = experts_module
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2:
        raise ValueError(
            f"moekit experts implementation ({_where(m)}): top_k_index {tuple(top_k_index.shape)} and top_k_weights "
            f"{tuple(top_k_weights.shape)} must both be (tokens, k)"
        )
    lead = hidden_states.shape[:-1]
    x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
    T, K = top_k_index.shape
    if x_TD.shape[0] != T:
        raise ValueError(
            f"moekit experts implementation ({_where(m)}): hidden_states has {x_TD.shape[0]} tokens but top_k_index "
            f"has {T} rows"
        )
    transposed = bool(m.is_transposed)
    up_name = "gate_up_proj" if m.has_gate else "up_proj"
    w_up = _as_EOI(_weight(m, up_name), transposed)  # (E, 2F or F, D)
    w_down = _as_EOI(_weight(m, "down_proj"), transposed)  # (E, D, F)
    E = w_up.shape[0]
    b_up = _bias(m, f"{up_name}_bias", E, w_up.shape[1]) if m.has_bias else None
    b_down = _bias(m, "down_proj_bias", E, w_down.shape[1]) if m.has_bias else None
    width = w_down.shape[2] * (2 if m.has_gate else 1)
    if w_down.shape[0] != E or width != w_up.shape[1] or w_up.shape[2] != x_TD.shape[-1]:
        raise ValueError(
            f"moekit experts implementation ({_where(m)}): inconsistent shapes {up_name} (as out, in) "
            f"{tuple(w_up.shape)}, down_proj {tuple(w_down.shape)}, hidden {x_TD.shape[-1]} (has_gate={m.has_gate})"
        )
    out_dtype = hidden_states.dtype
    x_TD = x_TD.to(w_up.dtype)  # as transformers' grouped_mm: compute in the weights' dtype
    if T * K <= FEW_PAIRS and x_TD.device.type == "cpu" and not torch.is_grad_enabled():
        return _few_pairs_forward(m, x_TD, top_k_index, top_k_weights, w_up, w_down, b_up, b_down).to(
            out_dtype).reshape(*lead, -1)

    # Pairs in slot-major grid order (pair j*T + t is token t's j-th choice): moekit's grid fast path.
    expert_N = top_k_index.t().reshape(-1)
    weight_N = top_k_weights.t().reshape(-1)
    token_N = torch.arange(T, device=x_TD.device).repeat(K)
    num_slots: int | None = K
    if getattr(m, "_is_expert_parallel", False):
        keep_N = (expert_N >= 0) & (expert_N < E)  # sentinels (other ranks' experts) contribute zero
        expert_N, weight_N, token_N, num_slots = expert_N[keep_N], weight_N[keep_N], token_N[keep_N], None
    a = Assignment(token_N, expert_N, weight_N, num_tokens=T, num_experts=E, num_slots=num_slots)
    plan = _DISPATCHER.plan(a)
    if plan.counts_E.shape[0] != E:
        raise ValueError(
            f"moekit experts implementation ({_where(m)}): top_k_index holds expert ids >= {E} (the number of experts "
            "in the weights) and the module is not marked expert-parallel"
        )
    x_ND, handle = _DISPATCHER.dispatch(x_TD, plan)

    # One implementation choice per call (every projection then takes the same path, one host sync at most).
    impl = auto_impl(x_ND, w_up, w_down)
    counts_E = plan.counts_E
    offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32) if impl == "grouped_mm" else None
    counts_list = counts_E.tolist() if impl in ("loop", "native") else None

    def proj(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        y = grouped_linear(h, w, counts_E, offsets_E, counts_list, impl)
        return y if b is None else y + b.index_select(0, plan.expert_N)

    y_ND = proj(_gate(m, proj(x_ND, w_up, b_up)), w_down, b_down)
    if m.has_post_expert_norm:
        y_ND = m.post_expert_norm(y_ND)
    return _DISPATCHER.combine(y_ND, plan, handle).to(out_dtype).reshape(*lead, -1)


# ---------------------------------------------------------------------------------------------------- registration


def register_hf(interface: Any = None) -> None:
    """Register ``"moekit"`` in transformers' ``ExpertsInterface`` (imports transformers). Idempotent.

    Also checks the installed decorator's layout flags: flags moekit does not know are remembered with their default
    values, and :func:`moekit_experts_forward` raises for a module that sets one.
    """
    if interface is None:
        from transformers.integrations import moe as interface  # noqa: PLC0415 (lazy: optional dependency)
    _note_unknown_flags(interface.use_experts_implementation)
    interface.ExpertsInterface.register(NAME, moekit_experts_forward)


def _note_unknown_flags(decorator: Any) -> None:
    params = inspect.signature(decorator).parameters
    for name, p in params.items():
        if name in ("experts_class", "experts_interface") or name in KNOWN_FLAGS:
            continue
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            _unknown_flags[name] = p.default


def is_registered() -> bool:
    """True when transformers is imported and ``"moekit"`` is in its ``ExpertsInterface`` (never imports it)."""
    moe = sys.modules.get(_HF_MOE_MODULE)
    return moe is not None and NAME in moe.ExpertsInterface._global_mapping


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.integrations.moe`` like the normal path finder, and registers moekit right after the
    module has executed. Removes itself after the first use."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 (importlib protocol)
        if fullname != _HF_MOE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        _remove_hook()
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec):  # noqa: ANN001
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self.inner.exec_module(module)
        register_hf(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.inner, name)


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def register_when_imported() -> None:
    """Register now if transformers' MoE integration is already imported, else when it is (no transformers import)."""
    moe = sys.modules.get(_HF_MOE_MODULE)
    if moe is not None:
        register_hf(moe)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
