"""Hugging Face transformers MoE blocks <-> moekit layers.

``from_hf(block)`` reads the MoE block of a transformers model (its router, expert bank and shared experts) and builds
a :class:`moekit.MoE` that computes the same function; ``to_hf(layer, block_or_config)`` writes a moekit layer back.
The semantics of each architecture were read from the transformers 5.23 source:

============================  =================================================================================
block class                   moekit layer
============================  =================================================================================
MixtralSparseMoeBlock,        TopK(k, softmax, normalize=True) + SwiGLU experts
MiniMaxSparseMoeBlock
Qwen2MoeSparseMoeBlock,       TopK(k, softmax, normalize=norm_topk_prob) + SwiGLU + shared SwiGLU, shared_gate=True
Qwen3NextSparseMoeBlock
Qwen3MoeSparseMoeBlock        TopK(k, softmax, normalize=norm_topk_prob) + SwiGLU experts
OlmoeSparseMoeBlock,          TopK(k, softmax, normalize=norm_topk_prob) + SwiGLU experts
FlexOlmoSparseMoeBlock
GraniteMoeMoE,                TopK(k, softmax, normalize=True) + SwiGLU experts (router is ``block.router``)
GraniteMoeSharedMoE
JambaSparseMoeBlock           TopK(k, softmax, normalize=False) + SwiGLU experts (router is ``block.router``)
DeepseekV2Moe                 TopK(k, softmax, normalize=False, scale=routed_scaling_factor[, n_group, topk_group,
                              group_score="max"], logits_dtype="float32") + SwiGLU + shared SwiGLU
DeepseekV3MoE, Glm4MoeMoE,    TopK(k, sigmoid, normalize=norm_topk_prob, scale=routed_scaling_factor, n_group,
Dots1MoE                      topk_group, group_score="top2sum", correction_bias=True) + SwiGLU + shared SwiGLU
SwitchTransformersSparseMLP   TopK(k=1, softmax, normalize=False, router_bias) + MLP(relu, no bias) experts,
                              Capacity(capacity=expert_capacity, per_sequence=True): a dropped token's MoE output
                              is zero (transformers 5.x; 4.x passed dropped tokens through scaled by their score)
============================  =================================================================================

The router's precision policy is copied too (``TopK.logits_dtype`` / ``score_dtype``): Mixtral, Qwen-MoE and OLMoE
take the softmax of input-dtype logits in float32, DeepSeek-V3 and SwitchTransformers compute the router in float32.

Weights: by default (``share=False``) they are *copied* into moekit's layout: HF's stacked ``gate_up_proj`` (E, 2F, D)
is the bank's fused ``w13_E2FD`` (the first F rows the gate, the last F rows up), ``down_proj`` (E, D, F)
becomes ``w2_EDF``; the router's ``weight`` (E, D) is the router's ``gate.weight``; a shared ``gate_proj`` /
``up_proj`` / ``down_proj`` MLP becomes ``w1_FD`` / ``w3_FD`` / ``w2_DF``. With ``share=True`` no memory is copied:
the router, shared-expert and expert-bank parameters *are* the HF ``Parameter`` objects (``w13_E2FD`` is
``gate_up_proj``, ``w2_EDF`` is ``down_proj``), so an in-place update through either side is seen by both.
SwitchTransformers keeps one ``nn.Linear`` per expert, which a stacked bank cannot view: it is always copied.

Differences that remain (training mode only): Mixtral's ``router_jitter_noise`` multiplies the hidden states seen by
the experts as well as by the router in HF; moekit's ``TopK(jitter=...)`` jitters the router input only.

transformers is imported lazily, inside functions.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..dispatch.local import Capacity, CapacityDispatcher, Dropless
from ..experts.bank import MLP, SwiGLU
from ..layer import MoE
from ..routers.topk import TopK, TopKRouter

# ----------------------------------------------------------------------------------------------------------- helpers

_ACT_BY_CLASS = {
    "SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELU": "gelu",
    "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "ReLU": "relu",
}
_ACT_BY_NAME = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "relu": "relu",
}
_HF_ACT_NAME = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def _activation(act: Any) -> str:
    """moekit's activation name for an HF activation module (or an ``hidden_act`` string)."""
    if isinstance(act, str):
        name = _ACT_BY_NAME.get(act)
        what = repr(act)
    else:
        name = _ACT_BY_CLASS.get(type(act).__name__)
        what = type(act).__name__
    if name is None:
        raise ValueError(
            f"from_hf: activation {what} has no moekit equivalent; supported: {', '.join(sorted(_ACT_BY_NAME))}"
        )
    return name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


@torch.no_grad()
def _put(dst: Tensor, src: Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"to_hf: {what} has shape {tuple(src.shape)} in the moekit layer but {tuple(dst.shape)} in "
                         "the target block")
    if not _same_storage(dst, src):
        dst.copy_(src)


def _empty_layer(dim: int, num_experts: int, ref: Tensor, **kw: Any) -> MoE:
    """A layer with uninitialised storage of ``ref``'s dtype and device (every tensor is then written)."""
    with torch.device("meta"):
        layer = MoE(dim, num_experts, **kw)
    return layer.to_empty(device=ref.device).to(ref.dtype)


def _check_router(layer: MoE, expected: TopK, block_name: str) -> None:
    spec = getattr(layer.router, "spec", None)
    if not isinstance(layer.router, TopKRouter) or not isinstance(spec, TopK):
        raise ValueError(f"to_hf: a {block_name} needs a TopK router, the layer has {type(layer.router).__name__}")
    # jitter too: a block whose router jitters (Mixtral, Switch) must not keep a jitter the layer does not have
    fields = ("k", "score", "normalize", "scale", "jitter", "n_group", "topk_group", "correction_bias", "router_bias")
    if expected.n_group is not None:
        fields += ("group_score",)
    diff = [f"{f}={getattr(spec, f)!r} (needs {getattr(expected, f)!r})" for f in fields
            if getattr(spec, f) != getattr(expected, f)]
    if diff:
        raise ValueError(f"to_hf: the layer's router does not compute what a {block_name} computes: {', '.join(diff)}")


def _check_experts(layer: MoE, glu: bool, bias: bool, activation: str, block_name: str) -> None:
    spec = layer.experts.spec
    if spec.glu != glu or spec.bias != bias or spec.activation.replace("swish", "silu") != activation:
        raise ValueError(
            f"to_hf: a {block_name} has experts glu={glu}, bias={bias}, activation={activation!r}; the layer has "
            f"glu={spec.glu}, bias={spec.bias}, activation={spec.activation!r}"
        )


def _check_dispatch(layer: MoE, expected: Any, block_name: str) -> None:
    disp = layer.dispatcher
    got = disp.spec if isinstance(disp, CapacityDispatcher) else Dropless()
    ok = got == expected if isinstance(expected, Capacity) else not isinstance(disp, CapacityDispatcher)
    if not ok:
        raise ValueError(f"to_hf: a {block_name} dispatches as {expected}, the layer as {got}")


# ------------------------------------------------------------------- the stacked-bank family (gate_up_proj layout)

def _read_bank(layer: MoE, experts: nn.Module, share: bool) -> None:
    gate_up, down = experts.gate_up_proj, experts.down_proj
    bank = layer.experts
    if share:  # the same Parameter objects: HF's gate_up_proj layout is the bank's w13_E2FD
        bank.w13_E2FD = gate_up
        bank.w2_EDF = down
    else:
        with torch.no_grad():
            bank.w13_E2FD.copy_(gate_up)
            bank.w2_EDF.copy_(down)


def _write_bank(layer: MoE, experts: nn.Module) -> None:
    _put(experts.gate_up_proj, layer.experts.w13_E2FD, "experts gate_up (w13_E2FD)")
    _put(experts.down_proj, layer.experts.w2_EDF, "experts down (w2_EDF)")


def _read_linear(owner: nn.Module, name: str, src: nn.Parameter, share: bool) -> None:
    if share:
        setattr(owner, name, src)
    else:
        with torch.no_grad():
            dst = getattr(owner, name)
            if dst.dtype == src.dtype:
                dst.copy_(src)
            else:  # keep a mixed-precision block's dtypes as share=True does (DeepSeek's float32 gate in a fp16 model)
                setattr(owner, name, nn.Parameter(src.detach().to(dst.device).clone(), requires_grad=dst.requires_grad))


def _read_shared(layer: MoE, mlp: nn.Module, share: bool) -> None:
    sh = layer.shared
    _read_linear(sh, "w1_FD", mlp.gate_proj.weight, share)
    _read_linear(sh, "w3_FD", mlp.up_proj.weight, share)
    _read_linear(sh, "w2_DF", mlp.down_proj.weight, share)


def _write_shared(layer: MoE, mlp: nn.Module) -> None:
    _put(mlp.gate_proj.weight, layer.shared.w1_FD, "shared expert gate_proj (w1_FD)")
    _put(mlp.up_proj.weight, layer.shared.w3_FD, "shared expert up_proj (w3_FD)")
    _put(mlp.down_proj.weight, layer.shared.w2_DF, "shared expert down_proj (w2_DF)")


def _softmax_router(gate: nn.Module, normalize: bool, jitter: float = 0.0) -> TopK:
    # Mixtral / Qwen-MoE / OLMoE: logits in the input dtype, softmax (and renormalisation) in float32.
    return TopK(k=gate.top_k, score="softmax", normalize=normalize, jitter=jitter, fp32=False, score_dtype="float32")


def _router_of(block: nn.Module) -> nn.Module:
    """The block's router module: ``gate`` in most blocks, ``router`` in Jamba's."""
    return block.gate if hasattr(block, "gate") else block.router


def _gated_family(block: nn.Module, share: bool, router: TopK, shared: nn.Module | None,
                  shared_gate: nn.Module | None) -> MoE:
    experts = block.experts
    E, D, Fh = experts.down_proj.shape[0], experts.down_proj.shape[1], experts.down_proj.shape[2]
    kw: dict[str, Any] = dict(router=router, experts=SwiGLU(hidden_dim=Fh, activation=_activation(experts.act_fn)))
    if shared is not None:
        kw["shared_experts"] = SwiGLU(hidden_dim=shared.gate_proj.out_features, activation=_activation(shared.act_fn))
        kw["shared_gate"] = shared_gate is not None
    layer = _empty_layer(D, E, experts.down_proj, **kw)
    _read_linear(layer.router.gate, "weight", _router_of(block).weight, share)
    _read_bank(layer, experts, share)
    if shared is not None:
        _read_shared(layer, shared, share)
    if shared_gate is not None:
        _read_linear(layer.shared_gate, "weight", shared_gate.weight, share)
    return layer


def _write_gated_family(layer: MoE, block: nn.Module, expected: TopK, name: str,
                        shared: nn.Module | None, shared_gate: nn.Module | None) -> None:
    experts = block.experts
    E, D, Fh = experts.down_proj.shape
    if (layer.num_experts, layer.dim, layer.experts.hidden_dim) != (E, D, Fh):
        raise ValueError(f"to_hf: the layer has E={layer.num_experts}, D={layer.dim}, F={layer.experts.hidden_dim}; "
                         f"the {name} has E={E}, D={D}, F={Fh}")
    _check_router(layer, expected, name)
    _check_experts(layer, glu=True, bias=False, activation=_activation(experts.act_fn), block_name=name)
    _check_dispatch(layer, Dropless(), name)
    if (layer.shared is None) != (shared is None) or (layer.shared_gate is None) != (shared_gate is None):
        raise ValueError(f"to_hf: a {name} has shared experts: {shared is not None}, shared gate: "
                         f"{shared_gate is not None}; the layer: {layer.shared is not None}, "
                         f"{layer.shared_gate is not None}")
    _put(_router_of(block).weight, layer.router.gate.weight, "router weight")
    _write_bank(layer, experts)
    if shared is not None:
        _write_shared(layer, shared)
    if shared_gate is not None:
        _put(shared_gate.weight, layer.shared_gate.weight, "shared_expert_gate weight")


# ------------------------------------------------------------------------------------------- one entry per block

def _mixtral_router(block: nn.Module) -> TopK:
    return _softmax_router(block.gate, normalize=True, jitter=float(block.jitter_noise))


def _qwen_router(block: nn.Module) -> TopK:
    return _softmax_router(block.gate, normalize=bool(block.gate.norm_topk_prob))


def _granite_router(block: nn.Module) -> TopK:
    # softmax over the k selected float32 logits == the float32 softmax over all experts, renormalised over the k
    return _softmax_router(block.router, normalize=True)


def _jamba_router(block: nn.Module) -> TopK:
    # top-k of the float32 softmax, weights left unnormalised
    return _softmax_router(block.router, normalize=False)


def _deepseek_router(block: nn.Module) -> TopK:
    g = block.gate
    return TopK(k=g.top_k, score="sigmoid", normalize=bool(g.norm_topk_prob), scale=float(g.routed_scaling_factor),
                n_group=g.num_group, topk_group=g.topk_group, group_score="top2sum", correction_bias=True,
                logits_dtype="float32")


def _read_plain(router_of: Callable) -> Callable:
    def read(block: nn.Module, share: bool) -> MoE:
        return _gated_family(block, share, router_of(block), None, None)
    return read


def _write_plain(router_of: Callable, name: str) -> Callable:
    def write(layer: MoE, block: nn.Module) -> None:
        _write_gated_family(layer, block, router_of(block), name, None, None)
    return write


def _read_qwen2(block: nn.Module, share: bool) -> MoE:
    return _gated_family(block, share, _qwen_router(block), block.shared_expert, block.shared_expert_gate)


def _write_qwen2(layer: MoE, block: nn.Module) -> None:
    _write_gated_family(layer, block, _qwen_router(block), type(block).__name__, block.shared_expert,
                        block.shared_expert_gate)


def _deepseek_v2_router(block: nn.Module) -> TopK:
    g = block.gate
    E = g.num_experts
    kw: dict[str, Any] = {}
    if g.topk_method == "group_limited_greedy":
        if g.top_k > g.topk_group * (E // g.num_group):
            raise ValueError(f"from_hf: DeepseekV2Moe with top_k={g.top_k} > topk_group={g.topk_group} groups of "
                             f"{E // g.num_group} experts gives the masked experts weight 0, which moekit's TopK does "
                             "not reproduce; use top_k <= topk_group * n_routed_experts / n_group")
        kw = dict(n_group=g.num_group, topk_group=g.topk_group, group_score="max")
    elif g.topk_method != "greedy":
        raise ValueError(f"from_hf: DeepseekV2Moe topk_method={g.topk_method!r} is not supported; supported: "
                         "'greedy', 'group_limited_greedy'")
    # float32 router, softmax, no renormalisation, routed_scaling_factor on the weights
    return TopK(k=g.top_k, score="softmax", normalize=False, scale=float(g.routed_scaling_factor),
                logits_dtype="float32", **kw)


def _read_deepseek_v2(block: nn.Module, share: bool) -> MoE:
    return _gated_family(block, share, _deepseek_v2_router(block), block.shared_experts, None)


def _write_deepseek_v2(layer: MoE, block: nn.Module) -> None:
    _write_gated_family(layer, block, _deepseek_v2_router(block), "DeepseekV2Moe", block.shared_experts, None)


def _read_deepseek(block: nn.Module, share: bool) -> MoE:
    layer = _gated_family(block, share, _deepseek_router(block), block.shared_experts, None)
    _read_buffer(layer.router, "bias_E", block.gate.e_score_correction_bias, share)
    return layer


def _write_deepseek(layer: MoE, block: nn.Module) -> None:
    name = type(block).__name__
    _write_gated_family(layer, block, _deepseek_router(block), name, block.shared_experts, None)
    _put(block.gate.e_score_correction_bias, layer.router.bias_E, "e_score_correction_bias (bias_E)")


def _read_buffer(owner: nn.Module, name: str, src: Tensor, share: bool) -> None:
    if share:
        setattr(owner, name, src)
    else:
        with torch.no_grad():
            buf = getattr(owner, name)
            setattr(owner, name, src.detach().to(device=buf.device, dtype=src.dtype).clone())


def _switch_router(block: nn.Module) -> TopK:
    r = block.router
    return TopK(k=1, score="softmax", normalize=False, jitter=float(r.jitter_noise),
                router_bias=r.classifier.bias is not None, logits_dtype=_dtype_name(r.dtype))


def _switch_dispatch(block: nn.Module) -> Capacity:
    return Capacity(capacity=int(block.router.expert_capacity), per_sequence=True, drop="position")


def _read_switch(block: nn.Module, share: bool) -> MoE:
    if share:
        raise ValueError("from_hf: SwitchTransformersSparseMLP keeps one nn.Linear per expert, which moekit's stacked "
                         "bank cannot share without copying; use share=False")
    experts = [block.experts[f"expert_{e}"] for e in range(block.router.num_experts)]
    Fh, D = experts[0].wi.weight.shape
    spec = MLP(hidden_dim=Fh, activation=_activation(experts[0].act), bias=False)
    layer = _empty_layer(D, len(experts), experts[0].wi.weight, router=_switch_router(block), experts=spec,
                         dispatch=_switch_dispatch(block))
    with torch.no_grad():
        layer.router.gate.weight.copy_(block.router.classifier.weight)
        if block.router.classifier.bias is not None:
            layer.router.gate.bias.copy_(block.router.classifier.bias)
        layer.experts.w1_EFD.copy_(torch.stack([m.wi.weight for m in experts]))
        layer.experts.w2_EDF.copy_(torch.stack([m.wo.weight for m in experts]))
    return layer


def _write_switch(layer: MoE, block: nn.Module) -> None:
    name = "SwitchTransformersSparseMLP"
    experts = [block.experts[f"expert_{e}"] for e in range(block.router.num_experts)]
    Fh, D = experts[0].wi.weight.shape
    if (layer.num_experts, layer.dim, layer.experts.hidden_dim) != (len(experts), D, Fh):
        raise ValueError(f"to_hf: the layer has E={layer.num_experts}, D={layer.dim}, F={layer.experts.hidden_dim}; "
                         f"the {name} has E={len(experts)}, D={D}, F={Fh}")
    _check_router(layer, _switch_router(block), name)
    _check_experts(layer, glu=False, bias=False, activation=_activation(experts[0].act), block_name=name)
    _check_dispatch(layer, _switch_dispatch(block), name)
    if layer.shared is not None:
        raise ValueError(f"to_hf: a {name} has no shared experts; the layer has")
    _put(block.router.classifier.weight, layer.router.gate.weight, "router weight")
    if block.router.classifier.bias is not None:
        _put(block.router.classifier.bias, layer.router.gate.bias, "router bias")
    for e, m in enumerate(experts):
        _put(m.wi.weight, layer.experts.w1_EFD[e], f"expert {e} wi (w1_EFD)")
        _put(m.wo.weight, layer.experts.w2_EDF[e], f"expert {e} wo (w2_EDF)")


@dataclass(frozen=True)
class _Arch:
    block_class: str  # the transformers class name of the MoE block
    package: str  # transformers.models.<package>.modeling_<package>
    model_type: str  # config.model_type
    read: Callable[[nn.Module, bool], MoE]
    write: Callable[[MoE, nn.Module], None]
    flat_logits: bool = True  # the HF router reports (T, E) logits (else (B, S, E))
    router_attr: str = "gate"  # the block's router child
    # HF router attribute -> dotted path of the moekit tensor/module holding it (what HF's _init_weights touches)
    router_fields: tuple[tuple[str, str], ...] = (("weight", "router.gate.weight"),)
    # the block's children -> the moekit part each one follows (dtype/device alignment on sync and revert)
    parts: tuple[tuple[str, str], ...] = (("gate", "router"), ("experts", "experts"))

    def block_type(self) -> type:
        module = importlib.import_module(f"transformers.models.{self.package}.modeling_{self.package}")
        return getattr(module, self.block_class)


_ARCHS = (
    _Arch("MixtralSparseMoeBlock", "mixtral", "mixtral", _read_plain(_mixtral_router),
          _write_plain(_mixtral_router, "MixtralSparseMoeBlock")),
    # Qwen2-MoE's block (sigmoid-gated shared expert), verbatim in Qwen3-Next (transformers 5.24)
    *(_Arch(block, package, package, _read_qwen2, _write_qwen2,
            parts=(("gate", "router"), ("experts", "experts"), ("shared_expert", "shared"),
                   ("shared_expert_gate", "shared_gate")))
      for block, package in (("Qwen2MoeSparseMoeBlock", "qwen2_moe"), ("Qwen3NextSparseMoeBlock", "qwen3_next"))),
    _Arch("MiniMaxSparseMoeBlock", "minimax", "minimax", _read_plain(_mixtral_router),  # Mixtral's block verbatim
          _write_plain(_mixtral_router, "MiniMaxSparseMoeBlock")),
    _Arch("Qwen3MoeSparseMoeBlock", "qwen3_moe", "qwen3_moe", _read_plain(_qwen_router),
          _write_plain(_qwen_router, "Qwen3MoeSparseMoeBlock")),
    _Arch("OlmoeSparseMoeBlock", "olmoe", "olmoe", _read_plain(_qwen_router),
          _write_plain(_qwen_router, "OlmoeSparseMoeBlock")),
    _Arch("FlexOlmoSparseMoeBlock", "flex_olmo", "flex_olmo", _read_plain(_qwen_router),  # OLMoE's block verbatim
          _write_plain(_qwen_router, "FlexOlmoSparseMoeBlock")),
    # Granite MoE (and Granite MoE-shared, whose shared MLP sits outside the block, in the decoder layer)
    *(_Arch(block, package, package, _read_plain(_granite_router), _write_plain(_granite_router, block),
            router_attr="router", parts=(("router", "router"), ("experts", "experts")))
      for block, package in (("GraniteMoeMoE", "granitemoe"), ("GraniteMoeSharedMoE", "granitemoeshared"))),
    _Arch("JambaSparseMoeBlock", "jamba", "jamba", _read_plain(_jamba_router),
          _write_plain(_jamba_router, "JambaSparseMoeBlock"), router_attr="router",
          parts=(("router", "router"), ("experts", "experts"))),
    _Arch("DeepseekV2Moe", "deepseek_v2", "deepseek_v2", _read_deepseek_v2, _write_deepseek_v2,
          parts=(("gate", "router"), ("experts", "experts"), ("shared_experts", "shared"))),
    # DeepSeek-V3's block, router and experts, verbatim in GLM-4-MoE and dots1 (transformers 5.24)
    *(_Arch(block, package, package, _read_deepseek, _write_deepseek,
            router_fields=(("weight", "router.gate.weight"), ("e_score_correction_bias", "router.bias_E")),
            parts=(("gate", "router"), ("experts", "experts"), ("shared_experts", "shared")))
      for block, package in (("DeepseekV3MoE", "deepseek_v3"), ("Glm4MoeMoE", "glm4_moe"), ("Dots1MoE", "dots1"))),
    _Arch("SwitchTransformersSparseMLP", "switch_transformers", "switch_transformers", _read_switch, _write_switch,
          flat_logits=False, router_attr="router", router_fields=(("classifier", "router.gate"),),
          parts=(("router", "router"), ("experts", "experts"))),
)
SUPPORTED_BLOCKS = tuple(a.block_class for a in _ARCHS)


def _arch_of(block: nn.Module) -> _Arch | None:
    by_name = {a.block_class: a for a in _ARCHS}
    for cls in type(block).__mro__:
        if cls.__name__ in by_name and cls.__module__.startswith("transformers."):
            return by_name[cls.__name__]
    return None


def _unsupported(what: str) -> ValueError:
    return ValueError(f"{what} is not a supported transformers MoE block; supported: {', '.join(SUPPORTED_BLOCKS)}")


# -------------------------------------------------------------------------------------------------------- public

def is_hf_moe_block(module: nn.Module) -> bool:
    """True for the transformers MoE blocks that :func:`from_hf` converts."""
    return _arch_of(module) is not None


def from_hf(block: nn.Module, *, share: bool = False) -> MoE:
    """A :class:`moekit.MoE` computing what the transformers MoE ``block`` computes (same dtype and device).

    ``share=False`` copies the weights into moekit's layout; ``share=True`` reuses the HF storage without a copy
    (router and shared-expert Parameters are the same objects; expert banks are Parameters viewing ``gate_up_proj``
    and ``down_proj``). The returned layer is in the block's train/eval mode.
    """
    arch = _arch_of(block)
    if arch is None:
        raise _unsupported(type(block).__name__)
    layer = arch.read(block, share)
    layer.train(block.training)
    return layer


def to_hf(layer: MoE, block_or_config: Any) -> nn.Module:
    """Write ``layer``'s weights into a transformers MoE block and return the block.

    ``block_or_config``: an existing block (written in place) or a transformers config of a supported model type (a
    new block is built from it, on the layer's device and dtype). Raises a ``ValueError`` when the block would not
    compute what the layer computes (shapes, router semantics, activation, shared experts, capacity).
    """
    if not isinstance(layer, MoE):
        raise TypeError(f"to_hf: expected a moekit.MoE, got {type(layer).__name__}")
    if isinstance(block_or_config, nn.Module):
        block = block_or_config
        arch = _arch_of(block)
        if arch is None:
            raise _unsupported(type(block).__name__)
    else:
        config = block_or_config
        model_type = getattr(config, "model_type", None)
        arch = next((a for a in _ARCHS if a.model_type == model_type), None)
        if arch is None:
            raise ValueError(f"to_hf: config model_type {model_type!r} is not supported; supported: "
                             f"{', '.join(a.model_type for a in _ARCHS)}")
        ref = layer.router.gate.weight
        block = arch.block_type()(config).to(device=ref.device, dtype=ref.dtype)
        block.train(layer.training)
    arch.write(layer, block)
    return block


# ---------------------------------------------------------------------------------------------- whole-model swap
# (in hf_swap.py; re-exported here so ``moekit.convert.hf`` keeps its public names)
from .hf_swap import HFBlockAdapter, SwapHandle, revert_hf_moe, swap_hf_moe  # noqa: E402,F401
