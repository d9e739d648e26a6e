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

What differs: float32 accumulation in another order (float32 layers agree with the composed path to ~1e-6
relative; a routing choice between two scores within that distance of each other may differ), and bfloat16
layers round once at the end instead of after every op (closer to float64). ``MoE.fuse_decode(False)`` turns it off
for a layer; the environment variable ``MOEKIT_FUSED_DECODE=0`` keeps it off for every layer built afterwards.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .ops import native

MAX_TOKENS = native.MAX_ROWS


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
        self._cache: tuple | None = None  # (weights key, prepared native call, weights need autograd)

    def _tensors(self) -> tuple[Tensor | None, ...]:
        bank, router = self.experts, self.router
        gate = router.gate
        return gate.weight, gate.bias, router.bias_E, bank.w_in, bank.b_in, bank.w2_EDF, bank.b2_ED

    def _prepared(self, dtype: torch.dtype) -> tuple[native.DecodeCall | None, bool]:
        """``(the native call for the parts' weights now, whether a weight needs autograd)``; ``(None, _)`` where
        the weights have no native form for inputs of ``dtype``. Checked once per placement of the weights: the key
        is every weight's address, dtype, shape, strides and ``requires_grad``, so ``.to()``, ``load_state_dict``
        with ``assign=True`` or a replaced ``.data`` are seen at the next call."""
        ts = self._tensors()
        key = (dtype, *(None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride(), t.requires_grad)
                        for t in ts))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
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
        return call, grad

    def takes(self, layer: nn.Module, x: Tensor) -> bool:
        """Whether ``layer(x)`` may run fused now (see the module docstring)."""
        return self._call_for(layer, x) is not None

    def _call_for(self, layer: nn.Module, x: Tensor) -> native.DecodeCall | None:
        if torch.compiler.is_compiling():  # torch.compile / torch.export trace the composed path
            return None
        if (layer.router is not self.router or layer.experts is not self.experts
                or layer.dispatcher is not self.dispatcher):
            return None
        if x.dim() < 1 or x.numel() > MAX_TOKENS * x.shape[-1] or x.numel() == 0:
            return None
        if x.dtype not in native.DTYPES or x.device.type != "cpu" or x.stride(-1) != 1:
            return None
        call, weights_grad = self._prepared(x.dtype)
        if call is None:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or weights_grad):
            return None
        if _hooked(self.router, self.experts, self.dispatcher, self.router.gate):
            return None
        return call

    def run(self, layer: nn.Module, x_TD: Tensor, logits: bool = False) -> tuple[Tensor, Tensor | None] | None:
        """``self(x_TD, logits)`` where ``layer`` may run fused now (:meth:`takes`), else None: the checks and the
        call at once."""
        call = self._call_for(layer, x_TD)
        return None if call is None else _invoke(call, x_TD, logits)

    def __call__(self, x_TD: Tensor, logits: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(y_TD, the router's float32 logits (T, E) when asked, else None)``."""
        call, _ = self._prepared(x_TD.dtype)
        if call is None:
            raise ValueError(f"moekit fused decode: the layer's weights have no native form for {x_TD.dtype} inputs")
        return _invoke(call, x_TD, logits)


def _invoke(call: native.DecodeCall, x_TD: Tensor, logits: bool) -> tuple[Tensor, Tensor | None]:
    out = call(x_TD.contiguous(), return_logits=logits)
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


def _hooked(*modules: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
