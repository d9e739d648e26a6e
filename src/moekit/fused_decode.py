"""One native call for an MoE layer's routed part at decode sizes (a few tokens, no autograd).

At one token, the layer's ~20 small torch ops (router linear, softmax, top-k, renormalise, plan, gather, combine)
cost more than their arithmetic: measured after the previous layer's weights have streamed through the caches, each
distinct op costs 15-60 us cold against 2-5 us warm, ~0.5 ms per layer call in all, a quarter of the time the
touched experts' weights take to read (docs/performance.md). :class:`DecodeFusion` runs the router's linear map,
its score function, top-k, renormalisation and scale, every touched expert's FFN and the weighted sum in one call
of :func:`moekit.ops.native.moe_decode`.

It is built once per layer from the layer's parts (:func:`fusion_for`, at construction) where their arithmetic has a
native form: a :class:`~moekit.TopK` router (softmax or sigmoid scores, optional selection bias, group limit,
renormalisation and scale) or :class:`~moekit.routers.TopKSoftmax` (gpt-oss), computing its logits in float32; the
dropless local dispatcher; a plain expert bank whose gating has a native form (the GLU or an activation, gpt-oss's
clamped and interleaved SwiGLU), its weights in either layout ((out, in), or the transposed views a swapped gpt-oss
keeps). The layer takes the fused call only when nothing would tell the difference: eval mode, no autograd needed,
at most :data:`MAX_TOKENS` tokens, the same parts as when it was built, no hooks on them, no routing log, replay or
statistics being kept, no per-call arguments (task, token ids, masks). Everything else runs the composed path.
After a call that passed every check, the next ones take :meth:`DecodeFusion.quick`: the same checks in one
function, against what the last fused call saw (a cold decode call is ~0.1 ms of Python otherwise).

What differs: float32 accumulation in another order (float32 layers agree with the composed path to ~1e-6
relative; a routing choice between two scores within that distance of each other may differ), and bfloat16
layers round once at the end instead of after every op (closer to float64). ``MoE.fuse_decode(False)`` turns it off
for a layer; the environment variable ``MOEKIT_FUSED_DECODE=0`` keeps it off for every layer built afterwards.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .ops import native

MAX_TOKENS = native.MAX_ROWS
_is_compiling = torch.compiler.is_compiling  # (bound once: a cold attribute chain costs microseconds a call)


class DecodeFusion:
    """The routed part of one layer (``router``, ``dispatcher``, ``experts``) as one native call. Holds the parts,
    not their tensors: weights are read at each call, so training, ``load_state_dict`` and ``.to(dtype)`` are
    seen."""

    def __init__(self, router: nn.Module, dispatcher: nn.Module, experts: nn.Module) -> None:
        self.router, self.dispatcher, self.experts = router, dispatcher, experts
        spec = router.spec
        self.k = spec.k
        self.score = "topk_softmax" if _is_topk_softmax(router) else spec.score
        self.normalize, self.scale = spec.normalize, float(spec.scale)
        self.groups = None if spec.n_group is None else (spec.n_group, spec.topk_group, spec.group_score)
        self.float32_logits = spec.logits_dtype == "float32" or (spec.logits_dtype is None and spec.fp32)
        self.gating = experts.native_gating()  # glu, activation (+ interleaved, clamp): fixed by the bank's spec
        # (weights key, prepared native call, weights need autograd): the call holds the weights' addresses, not the
        # tensors (a layer moved with .to() frees its old weights); each call holds the tensors it read while it runs
        self._cache: tuple | None = None
        # the bank's input projection by the name it is stored under, where it is ExpertBank's own property
        self._w_in, self._b_in = _stored_name(experts, "w_in"), _stored_name(experts, "b_in")
        # the parts' forward-hook dicts (registering a hook adds to them), refreshed when the router's gate is replaced
        self._gate = _read(router, "gate")
        self._hooks = _hook_dicts(router, experts, dispatcher, self._gate)
        # the last call's parts for quick(): (call, where each part was read, a weak reference to it and a weight's
        # data pointer and shape), set by a call that passed every check
        self._quick: tuple | None = None

    def _tensors(self) -> tuple[Tensor | None, ...]:
        bank, router = self.experts, self.router
        gate = _read(router, "gate")
        if gate is not self._gate:  # a replaced gate: watch its hooks instead
            self._gate, self._hooks = gate, _hook_dicts(router, bank, self.dispatcher, gate)
        return (_read(gate, "weight"), _read(gate, "bias"), _read(router, "bias_E"), _read(bank, self._w_in),
                _read(bank, self._b_in), _read(bank, "w2_EDF"), _read(bank, "b2_ED"))

    def _prepared(self, dtype: torch.dtype) -> tuple[native.DecodeCall | None, bool, tuple]:
        """``(the native call for the parts' weights now, whether a weight needs autograd, those weights)``;
        ``(None, ...)`` where the weights have no native form for inputs of ``dtype``. The caller holds the weights
        while the call runs (a property may compute one: the call's address is that temporary's). Checked once per
        placement of the weights: the key is every weight's address, dtype, shape, strides and ``requires_grad``,
        so ``.to()``, ``load_state_dict`` with ``assign=True`` or a replaced ``.data`` are seen at the next call."""
        ts = self._tensors()
        key = (dtype, *(None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride(), t.requires_grad)
                        for t in ts))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2], ts
        w_gate, b_gate, bias_E, w_in, b_in, w2, b2 = ts
        ok = (native.takes_weight_storage(w_in, b_in, dtype) and native.takes_weight_storage(w2, b2, dtype)
              and w_gate.dtype == dtype and w_gate.stride(1) == 1 and (b_gate is None or b_gate.dtype == dtype)
              and (dtype == torch.float32 or self.float32_logits))
        call = None
        if ok and native.available():
            call = native.prepare_moe_decode(w_gate.shape[1], w_gate, b_gate, self.k, self.score, self.normalize,
                                             self.scale, bias_E, w_in, b_in, w2, b2, groups=self.groups,
                                             dtype=dtype, **self.gating)
        grad = any(t is not None and t.requires_grad for t in (w_gate, b_gate, w_in, b_in, w2, b2))
        if call is None or not call.copied:  # a converted selection bias is a copy of its values: prepare each time
            self._cache = (key, call, grad)
        return call, grad, ts

    def takes(self, layer: nn.Module, x: Tensor) -> bool:
        """Whether ``layer(x)`` may run fused now for a (T, D) ``x`` (see the module docstring)."""
        return self._call_for(layer, x) is not None

    def _call_for(self, layer: nn.Module, x: Tensor) -> tuple[native.DecodeCall, tuple] | None:
        """``(the call, the weights it reads)`` where ``layer(x)`` may run fused now, else None."""
        if torch.compiler.is_compiling():  # torch.compile / torch.export trace the composed path
            return None
        parts = layer._modules
        if (parts.get("router") is not self.router or parts.get("experts") is not self.experts
                or parts.get("dispatcher") is not self.dispatcher):
            return None
        if x.dim() != 2 or not 0 < x.shape[0] <= MAX_TOKENS:
            return None
        if x.dtype not in native.DTYPES or not x.is_cpu or x.stride(-1) != 1:
            return None
        call, weights_grad, weights = self._prepared(x.dtype)
        if call is None or x.shape[1] != call.D:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or weights_grad):
            return None
        if _module._global_forward_hooks or _module._global_forward_pre_hooks or any(self._hooks):
            return None
        if self._quick is None or self._quick[0] is not call:
            self._quick = self._quick_state(call)
        return call, weights

    def _quick_state(self, call: native.DecodeCall) -> tuple | None:
        """What :meth:`quick` compares: ``(call, slots)``, each slot the module dict a part was read from, its name,
        a weak reference to what it held (None for None) and, for a tensor, its data pointer and shape. None where a
        part is computed (a subclass's property: a new tensor each read) or where the call holds a converted copy
        of the selection bias (prepared again at every call, so an in-place update of the bias is seen)."""
        if call.copied:
            return None
        router, bank = self.router, self.experts
        gate = self._gate
        slots = []
        for module, name in ((router, "gate"), (gate, "weight"), (gate, "bias"), (router, "bias_E"),
                             (bank, self._w_in), (bank, self._b_in), (bank, "w2_EDF"), (bank, "b2_ED")):
            store, v = _slot(module, name)
            if store is None:
                return None
            tensor = isinstance(v, Tensor)
            slots.append((store, name, None if v is None else weakref.ref(v), v.data_ptr() if tensor else None,
                          v.shape if tensor else None))
        return call, tuple(slots)

    def quick(self, layer: nn.Module, x: Tensor, logits: bool = False) -> tuple[Tensor, Tensor | None] | None:
        """``(layer(x), the router's float32 logits (T, E) when asked, else None)`` as the fused call, for a (T, D) or
        contiguous (B, S, D) ``x`` under ``torch.no_grad``, where nothing changed since the last fused call: the same
        parts, weights at the same addresses and shapes, no hooks, no per-call state on the layer. Else None, and
        the caller takes the full checks (:meth:`run`). The same checks as :meth:`run` in fewer Python calls: after
        a layer's weights have streamed through the caches, each costs microseconds."""
        q = self._quick
        if q is None or torch.is_grad_enabled() or _is_compiling():
            return None
        d = layer.__dict__
        if (d["training"] or d["routing_log"] is not None or d["replay_queue"] is not None or d["accumulate_stats"]
                or d["check_inputs"] or d["_modules"].get("shared") is not None or d.get("shared") is not None):
            return None
        call, slots = q
        if type(x) is not Tensor or x.dtype is not call.dtype or not x.is_cpu:
            return None
        shape = x.shape
        if len(shape) == 2:
            T, D = shape
            s0, s1 = x.stride()
            if s1 != 1:
                return None
        elif len(shape) == 3 and x.is_contiguous():  # (B, S, D): the rows are D apart (a transformers block's input)
            T, D = shape[0] * shape[1], shape[2]
            s0 = D
        else:
            return None
        if not 0 < T <= MAX_TOKENS or D != call.D:
            return None
        for store, name, ref, ptr, w_shape in slots:
            held = None if ref is None else ref()
            if store.get(name, _MISSING) is not held or (held is None and ref is not None):  # (a part freed: None)
                return None
            if ptr is not None and (held.data_ptr() != ptr or held.shape != w_shape):
                return None
        if (_module._global_forward_hooks or _module._global_forward_pre_hooks or any(self._hooks)
                or d["_modules"].get("router") is not self.router or d["_modules"].get("experts") is not self.experts
                or d["_modules"].get("dispatcher") is not self.dispatcher):
            return None
        if d["last_aux_loss"] is not None:
            layer.last_aux_loss = None
        return call.launch_checked(x, T, s0, shape, logits)

    def run(self, layer: nn.Module, x_TD: Tensor, logits: bool = False) -> tuple[Tensor, Tensor | None] | None:
        """``self(x_TD, logits)`` where ``layer`` may run fused now (:meth:`takes`), else None: the checks and the
        call at once."""
        found = self._call_for(layer, x_TD)
        if found is None:
            return None
        call, weights = found  # (held until the call returns: their addresses are the call's)
        return call.checked(x_TD, logits)

    def __call__(self, x_TD: Tensor, logits: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(y_TD, the router's float32 logits (T, E) when asked, else None)``."""
        call, _, weights = self._prepared(x_TD.dtype)
        if call is None:
            raise ValueError(f"moekit fused decode: the layer's weights have no native form for {x_TD.dtype} inputs")
        out = call(x_TD.contiguous(), return_logits=logits)  # (the call checks x_TD; weights held until it returns)
        return out if logits else (out, None)


def fusion_for(layer: nn.Module) -> tuple[DecodeFusion | None, str | None]:
    """``(fusion, None)`` where ``layer``'s parts have a native fused form, else ``(None, why not)``."""
    from .dispatch.local import LocalDispatcher
    from .experts.bank import ExpertBank
    from .layer import MoE
    from .routers.topk import TopKRouter

    if os.environ.get("MOEKIT_FUSED_DECODE", "1") == "0":
        return None, "disabled by MOEKIT_FUSED_DECODE=0"
    if type(layer).forward_with_aux is not MoE.forward_with_aux:
        return None, f"{type(layer).__name__} overrides forward_with_aux"
    router, dispatcher, bank = layer.router, layer.dispatcher, layer.experts
    if not (type(router) is TopKRouter or _is_topk_softmax(router)) or type(router).select is not TopKRouter.select:
        return None, f"router {type(router).__name__} has no fused form (TopK and TopKSoftmax do)"
    spec = router.spec
    if router.noise is not None:
        return None, "noisy-gated routing"
    if spec.logits_dtype not in (None, "float32") or spec.score_dtype not in (None, "float32"):
        return None, f"router computes in {spec.logits_dtype or spec.score_dtype}"
    if type(dispatcher) is not LocalDispatcher:
        return None, f"dispatcher {type(dispatcher).__name__} (only the dropless local one is fused)"
    if getattr(dispatcher, "weight_at", "output") != "output":
        return None, "combine weights applied at the input"
    if (not isinstance(bank, ExpertBank) or type(bank).forward is not ExpertBank.forward
            or bank.native_gating() is None):
        return None, f"experts {type(bank).__name__} (a plain bank with the native GLU or activation is fused)"
    if layer.free_experts is not None:
        return None, "compute-free experts"
    return DecodeFusion(router, dispatcher, bank), None


def _is_topk_softmax(router: nn.Module) -> bool:
    from .routers.topk_softmax import TopKSoftmaxRouter

    return type(router) is TopKSoftmaxRouter


def _hook_dicts(*modules: nn.Module) -> tuple[dict, ...]:
    """Each module's forward and forward-pre hook dicts (non-empty: a hook is registered)."""
    return tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))


_MISSING = object()


def _read(module: nn.Module, name: str):
    """``getattr(module, name)`` for a name that is no property of its class, reading the module's own dicts first
    (``nn.Module.__getattr__`` costs ~0.5-2 us a lookup, a decode call makes about ten): a plain attribute (a None
    bias), then a parameter, then a buffer or a submodule; anything else through ``getattr``."""
    return _slot(module, name)[1]


def _slot(module: nn.Module, name: str) -> tuple[dict | None, object]:
    """``(the dict of module's that holds name, its value)`` as :func:`_read` finds it; ``(None, value)`` where only
    ``getattr`` does (a property)."""
    d = module.__dict__
    for store in (d, d["_parameters"], d["_buffers"], d["_modules"]):
        v = store.get(name, _MISSING)
        if v is not _MISSING:
            return store, v
    return None, getattr(module, name)


def _stored_name(bank: nn.Module, name: str) -> str:
    """The name :func:`_read` reads for ``bank.<name>`` (``w_in``, ``b_in``): ExpertBank's own properties resolve to
    the tensor they return (``w13_E2FD`` or ``w1_EFD``, ``b13_E2F`` or ``b1_EF``); a name a subclass redefines stays
    the property, read through ``getattr``."""
    from .experts.bank import ExpertBank

    if getattr(type(bank), name) is not getattr(ExpertBank, name):
        return name
    glu = bank.spec.glu
    return {"w_in": "w13_E2FD" if glu else "w1_EFD", "b_in": "b13_E2F" if glu else "b1_EF"}[name]
