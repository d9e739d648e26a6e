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
GptOssMLP                     TopKSoftmax(k, router_bias=True) (top-k of the logits, softmax over the k) +
                              ClampedSwiGLU(alpha, limit, interleaved=True, bias=True) experts
Ernie4_5_MoeSparseMoeBlock    TopK(k, softmax, normalize=True, correction_bias=True, logits_dtype="float32") +
                              SwiGLU + shared SwiGLU
HunYuanMoEV1Moe               TopK(k, softmax, normalize=True) (float32 router) + SwiGLU + shared SwiGLU
PhimoeSparseMoeBlock          SparseMixer(k=2, eps=router_jitter_noise) + SwiGLU experts
LongcatFlashMoE               TopKFree(k, softmax, normalize=False, scale, correction_bias=True, copy=zero_expert_num)
                              + SwiGLU experts; the zero-computation experts are moekit's compute-free copy experts
Llama4TextMoe                 TopK(k, sigmoid, normalize=False) + SwiGLU + shared SwiGLU, Dropless(weight_at="input"):
                              the router weight scales each expert's *input* (gate_up_proj stored (E, D, 2F))
============================  =================================================================================

Blocks that are another row's verbatim are rows of their own: MiniMax (Mixtral's), Qwen3-Next and Qwen4-Exp
(Qwen2-MoE's), FlexOlmo (OLMoE's), Mellum (Qwen3-MoE's), Granite MoE-shared and -SWA (Granite MoE's), GLM-4-MoE,
dots1, DeepSeek-V3.2, GLM-4.7-Flash, GLM-4.5V, Solar Open, GLM-5 DSA and MiniCPM-5-MoE (DeepSeek-V3's),
Unlimited-OCR's text tower (DeepSeek-V2's); Qwen3-VL-MoE, Qwen3-Omni (thinker) and Qwen3.5-MoE are Qwen-MoE blocks
whose router always renormalises. The newer rows are *described* by a :class:`_Layout` (paths of the router weight,
biases, shared MLP, the bank layout, and the router/expert specs).

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

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..dispatch.local import Capacity, Dropless
from ..experts.bank import FFN, MLP, SwiGLU
from ..experts.clamped import ClampedSwiGLU
from ..layer import MoE
from ..routers.base import RouterSpec
from ..routers.sparsemixer import SparseMixer
from ..routers.topk import TopK, TopKRouter
from ..routers.topk_free import TopKFree
from ..routers.topk_softmax import TopKSoftmax

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


# precision fields: how a router rounds, not what it computes (a layer moved to another dtype keeps its semantics)
_PRECISION_FIELDS = ("fp32", "logits_dtype", "score_dtype")


def _check_router(layer: MoE, expected: RouterSpec, block_name: str) -> None:
    spec = getattr(layer.router, "spec", None)
    if type(spec) is not type(expected):
        raise ValueError(f"to_hf: a {block_name} needs a {type(expected).__name__} router, the layer has "
                         f"{type(spec).__name__ if spec is not None else type(layer.router).__name__}")
    if not isinstance(expected, TopK):
        fields = tuple(f.name for f in dataclasses.fields(expected) if f.name not in _PRECISION_FIELDS)
    else:
        if not isinstance(layer.router, TopKRouter):
            raise ValueError(f"to_hf: a {block_name} needs a TopK router, the layer has {type(layer.router).__name__}")
        # jitter too: a block whose router jitters (Mixtral, Switch) must not keep a jitter the layer does not have
        fields = ("k", "score", "normalize", "scale", "jitter", "n_group", "topk_group", "correction_bias",
                  "router_bias")
        fields += tuple(f.name for f in dataclasses.fields(expected)
                        if f.name not in {f.name for f in dataclasses.fields(TopK)})  # a subclass's own fields
        if expected.n_group is not None:
            fields += ("group_score",)
    diff = [f"{f}={getattr(spec, f)!r} (needs {getattr(expected, f)!r})" for f in fields
            if getattr(spec, f) != getattr(expected, f)]
    if diff:
        raise ValueError(f"to_hf: the layer's router does not compute what a {block_name} computes: {', '.join(diff)}")


def _check_experts(layer: MoE, glu: bool, bias: bool, activation: str, block_name: str,
                   expected: FFN | None = None) -> None:
    spec = layer.experts.spec
    if expected is not None and (type(spec) is not type(expected) or
                                 dataclasses.replace(spec, impl="auto", hidden_dim=None) !=
                                 dataclasses.replace(expected, impl="auto", hidden_dim=None)):
        raise ValueError(f"to_hf: a {block_name} has experts {expected}; the layer has {spec}")
    if spec.glu != glu or spec.bias != bias or spec.activation.replace("swish", "silu") != activation:
        raise ValueError(
            f"to_hf: a {block_name} has experts glu={glu}, bias={bias}, activation={activation!r}; the layer has "
            f"glu={spec.glu}, bias={spec.bias}, activation={spec.activation!r}"
        )


def _check_dispatch(layer: MoE, expected: Any, block_name: str) -> None:
    got = getattr(layer.dispatcher, "spec", Dropless())  # a dispatcher module built without a spec counts as dropless
    if got != expected:
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


def _qwen_normalized_router(block: nn.Module) -> TopK:
    # Qwen3-VL-MoE, Qwen3.5-MoE, Qwen3-Omni: Qwen-MoE's router with the renormalisation always on (no norm_topk_prob)
    return _softmax_router(block.gate, normalize=True)


def _read_gated_shared(router_of: Callable) -> Callable:
    def read(block: nn.Module, share: bool) -> MoE:
        return _gated_family(block, share, router_of(block), block.shared_expert, block.shared_expert_gate)
    return read


def _write_gated_shared(router_of: Callable) -> Callable:
    def write(layer: MoE, block: nn.Module) -> None:
        _write_gated_family(layer, block, router_of(block), type(block).__name__, block.shared_expert,
                            block.shared_expert_gate)
    return write


_read_qwen2, _write_qwen2 = _read_gated_shared(_qwen_router), _write_gated_shared(_qwen_router)


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
    _write_gated_family(layer, block, _deepseek_v2_router(block), type(block).__name__, block.shared_experts, None)


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


# ------------------------------------------------------------- blocks described by data (paths + router + experts)

@dataclass(frozen=True)
class _Layout:
    """Where a block keeps its parts and what they compute; :func:`_reader` / :func:`_writer` do the rest.

    ``router`` and ``experts`` map the block to moekit specs; the paths are dotted attribute paths inside the block.
    ``bank``: ``"stacked"``: ``gate_up_proj`` (E', 2F, D) as ``[gate; up]`` (only the first E rows are FFN experts
    when E' > E, LongCat-Flash), ``down_proj`` (E, D, F); ``"transposed"``: ``gate_up_proj`` (E, D, 2F)
    and ``down_proj`` (E, F, D), plus ``gate_up_proj_bias`` / ``down_proj_bias`` where the block has them (gpt-oss;
    Llama 4 has none); whether gate/up columns are interleaved (gpt-oss) or ``[gate | up]`` (Llama 4) is the experts
    spec's business. ``dispatch`` is the layer's dispatch spec (where the router weight applies).
    """

    router: Callable[[nn.Module], RouterSpec]
    experts: Callable[[nn.Module], FFN]
    router_weight: str  # the (E, D) routing matrix
    router_bias: str | None = None  # the routing map's bias (gpt-oss)
    selection_bias: str | None = None  # a score-correction bias used for selection only (-> router.bias_E)
    shared: str | None = None  # a gate_proj/up_proj/down_proj MLP every token passes through
    bank: str = "stacked"
    dispatch: Dropless = Dropless()


def _path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _bank_tensors(block: nn.Module, lay: _Layout) -> dict[str, Tensor]:
    """moekit bank name -> the HF tensor viewed in moekit's layout (a view: writing it writes HF's storage)."""
    ex = block.experts
    E = ex.down_proj.shape[0]
    if lay.bank == "transposed":
        bank = {"w13_E2FD": ex.gate_up_proj.transpose(1, 2), "w2_EDF": ex.down_proj.transpose(1, 2)}
        if getattr(ex, "gate_up_proj_bias", None) is not None:
            bank |= {"b13_E2F": ex.gate_up_proj_bias, "b2_ED": ex.down_proj_bias}
        return bank
    gate_up = ex.gate_up_proj if ex.gate_up_proj.shape[0] == E else ex.gate_up_proj[:E]
    return {"w13_E2FD": gate_up, "w2_EDF": ex.down_proj}


def _adopt(owner: nn.Module, name: str, src: Tensor, share: bool) -> None:
    """``owner.name`` takes ``src``'s values: by copy, or (share) as ``src`` itself when it is a Parameter, else as a
    new Parameter viewing ``src``'s storage."""
    if not share:
        with torch.no_grad():
            getattr(owner, name).copy_(src)
        return
    setattr(owner, name, src if isinstance(src, nn.Parameter) else nn.Parameter(src, requires_grad=src.requires_grad))


def _shared_spec(mlp: nn.Module) -> SwiGLU:
    act = mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn  # Llama 4's MLP names it activation_fn
    return SwiGLU(hidden_dim=mlp.gate_proj.out_features, activation=_activation(act),
                  bias=mlp.gate_proj.bias is not None)


def _shared_pairs(mlp: nn.Module) -> list[tuple[str, Tensor]]:
    out = [("w1_FD", mlp.gate_proj.weight), ("w3_FD", mlp.up_proj.weight), ("w2_DF", mlp.down_proj.weight)]
    if mlp.gate_proj.bias is not None:
        out += [("b1_F", mlp.gate_proj.bias), ("b3_F", mlp.up_proj.bias), ("b2_D", mlp.down_proj.bias)]
    return out


def _reader(lay: _Layout) -> Callable[[nn.Module, bool], MoE]:
    def read(block: nn.Module, share: bool) -> MoE:
        bank = _bank_tensors(block, lay)
        E, D = bank["w2_EDF"].shape[:2]
        kw: dict[str, Any] = dict(router=lay.router(block), experts=lay.experts(block), dispatch=lay.dispatch)
        mlp = _path(block, lay.shared) if lay.shared is not None else None
        if mlp is not None:
            kw["shared_experts"] = _shared_spec(mlp)
        layer = _empty_layer(D, E, bank["w2_EDF"], **kw)
        _adopt(layer.router.gate, "weight", _path(block, lay.router_weight), share)
        if lay.router_bias is not None:
            _adopt(layer.router.gate, "bias", _path(block, lay.router_bias), share)
        if lay.selection_bias is not None:
            _read_buffer(layer.router, "bias_E", _path(block, lay.selection_bias).detach().view(-1), share)
        for name, t in bank.items():
            _adopt(layer.experts, name, t, share)
        if mlp is not None:
            for name, t in _shared_pairs(mlp):
                _adopt(layer.shared, name, t, share)
        return layer
    return read


def _writer(lay: _Layout, block_name: str) -> Callable[[MoE, nn.Module], None]:
    def write(layer: MoE, block: nn.Module) -> None:
        bank = _bank_tensors(block, lay)
        E, D, Fh = bank["w2_EDF"].shape
        if (layer.num_experts, layer.dim, layer.experts.hidden_dim) != (E, D, Fh):
            raise ValueError(f"to_hf: the layer has E={layer.num_experts}, D={layer.dim}, "
                             f"F={layer.experts.hidden_dim}; the {block_name} has E={E}, D={D}, F={Fh}")
        _check_router(layer, lay.router(block), block_name)
        expected = lay.experts(block)
        _check_experts(layer, glu=expected.glu, bias=expected.bias, activation=expected.activation,
                       block_name=block_name, expected=expected)
        _check_dispatch(layer, lay.dispatch, block_name)
        mlp = _path(block, lay.shared) if lay.shared is not None else None
        if (layer.shared is None) != (mlp is None):
            raise ValueError(f"to_hf: a {block_name} has shared experts: {mlp is not None}; the layer: "
                             f"{layer.shared is not None}")
        if layer.shared_gate is not None:
            raise ValueError(f"to_hf: a {block_name} has no shared-expert gate; the layer has one")
        _put(_path(block, lay.router_weight), layer.router.gate.weight, "router weight")
        if lay.router_bias is not None:
            _put(_path(block, lay.router_bias), layer.router.gate.bias, "router bias")
        if lay.selection_bias is not None:
            _put(_path(block, lay.selection_bias).view(-1), layer.router.bias_E, "selection bias (bias_E)")
        for name, t in bank.items():
            _put(t, getattr(layer.experts, name), f"experts {name}")
        if mlp is not None:
            for name, t in _shared_pairs(mlp):
                _put(t, getattr(layer.shared, name), f"shared expert {name}")
    return write


def _silu_bank(block: nn.Module) -> SwiGLU:
    ex = block.experts
    return SwiGLU(hidden_dim=ex.down_proj.shape[2], activation=_activation(ex.act_fn))


def _llama4_bank(block: nn.Module) -> SwiGLU:
    ex = block.experts  # down_proj is (E, F, D)
    return SwiGLU(hidden_dim=ex.down_proj.shape[1], activation=_activation(ex.act_fn))


def _llama4_router(block: nn.Module) -> TopK:
    # logits in the input dtype, top-k of the logits, sigmoid of the k selected in float32 (cast back), no
    # renormalisation; the weights scale the expert *inputs* (the layout's dispatch)
    return TopK(k=block.router.top_k, score="sigmoid", normalize=False, fp32=False, score_dtype="float32")


def _gpt_oss_router(block: nn.Module) -> TopKSoftmax:
    # logits x W^T + b in the input dtype, top-k of the logits, softmax over the k selected (in that dtype)
    return TopKSoftmax(k=block.router.top_k, router_bias=True, fp32=False)


def _gpt_oss_experts(block: nn.Module) -> ClampedSwiGLU:
    ex = block.experts
    return ClampedSwiGLU(hidden_dim=ex.down_proj.shape[1], alpha=float(ex.alpha), limit=float(ex.limit),
                         interleaved=True, bias=True)


def _ernie_router(block: nn.Module) -> TopK:
    g = block.gate
    if g.norm_min > g.top_k / g.num_experts:
        raise ValueError(f"from_hf: Ernie4_5_MoeSparseMoeBlock with moe_norm_min={g.norm_min} > top_k / num_experts "
                         f"= {g.top_k / g.num_experts} floors the renormalisation, which moekit's TopK does not do")
    # float32 router, softmax, selection on softmax + e_score_correction_bias, renormalised over the k
    return TopK(k=g.top_k, score="softmax", normalize=True, correction_bias=True, logits_dtype="float32")


def _hunyuan_router(block: nn.Module) -> TopK:
    g = block.gate
    # the logits in float32 when wg is float32 (as built), else in its dtype; softmax and renormalisation in float32
    precision = (dict(logits_dtype="float32") if g.wg.weight.dtype == torch.float32
                 else dict(fp32=False, score_dtype="float32"))
    return TopK(k=g.top_k, score="softmax", normalize=True, **precision)


def _phimoe_router(block: nn.Module) -> SparseMixer:
    r = block.router  # PhiMoE routes 2 experts whatever num_experts_per_tok says
    return SparseMixer(k=2, eps=float(r.router_jitter_noise), input_jitter=float(r.input_jitter_noise))


def _longcat_router(block: nn.Module) -> TopKFree:
    r = block.router
    zero = r.n_routed_experts - block.experts.down_proj.shape[0]  # router ids past the FFN experts: identities
    return TopKFree(k=r.top_k, score="softmax", normalize=False, scale=float(r.routed_scaling_factor),
                    correction_bias=True, logits_dtype="float32", copy=zero)


_GPT_OSS = _Layout(_gpt_oss_router, _gpt_oss_experts, "router.weight", router_bias="router.bias", bank="transposed")
_ERNIE = _Layout(_ernie_router, _silu_bank, "gate.weight", selection_bias="gate.moe_statics.e_score_correction_bias",
                 shared="shared_experts")
_HUNYUAN = _Layout(_hunyuan_router, _silu_bank, "gate.wg.weight", shared="shared_mlp")
_PHIMOE = _Layout(_phimoe_router, _silu_bank, "router.weight")
_LLAMA4 = _Layout(_llama4_router, _llama4_bank, "router.weight", shared="shared_expert", bank="transposed",
                  dispatch=Dropless(weight_at="input"))
_LONGCAT = _Layout(_longcat_router, _silu_bank, "router.classifier.weight",
                   selection_bias="router.e_score_correction_bias")


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
    returns_tuple: bool = False  # the block returns (hidden, router output) (gpt-oss)
    flat_output: bool = False  # the block returns (T, D) hidden states whatever its input's shape (Llama 4)

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
    # Qwen-MoE blocks whose router always renormalises
    *(_Arch(block, package, package, _read_plain(_qwen_normalized_router),
            _write_plain(_qwen_normalized_router, block))
      for block, package in (("Qwen3VLMoeTextSparseMoeBlock", "qwen3_vl_moe"),
                             ("Qwen3OmniMoeThinkerTextSparseMoeBlock", "qwen3_omni_moe"))),
    _Arch("Qwen3_5MoeSparseMoeBlock", "qwen3_5_moe", "qwen3_5_moe", _read_gated_shared(_qwen_normalized_router),
          _write_gated_shared(_qwen_normalized_router),
          parts=(("gate", "router"), ("experts", "experts"), ("shared_expert", "shared"),
                 ("shared_expert_gate", "shared_gate"))),
    # blocks that are another row's verbatim (router, experts and forward; transformers 5.24)
    _Arch("MellumSparseMoeBlock", "mellum", "mellum", _read_plain(_qwen_router),  # Qwen3-MoE's
          _write_plain(_qwen_router, "MellumSparseMoeBlock")),
    _Arch("Qwen4ExpTextSparseMoeBlock", "qwen4_exp", "qwen4_exp", _read_qwen2, _write_qwen2,  # Qwen2-MoE's
          parts=(("gate", "router"), ("experts", "experts"), ("shared_expert", "shared"),
                 ("shared_expert_gate", "shared_gate"))),
    _Arch("GraniteMoeSWAMoE", "granitemoe_swa", "granitemoe_swa", _read_plain(_granite_router),  # Granite MoE's
          _write_plain(_granite_router, "GraniteMoeSWAMoE"), router_attr="router",
          parts=(("router", "router"), ("experts", "experts"))),
    _Arch("UnlimitedOcrTextMoe", "unlimited_ocr", "unlimited_ocr", _read_deepseek_v2, _write_deepseek_v2,  # V2's
          parts=(("gate", "router"), ("experts", "experts"), ("shared_experts", "shared"))),
    # DeepSeek-V3's block (as GLM-4-MoE's) in DeepSeek-V3.2, GLM-4.7-Flash (lite), GLM-4.5V's text tower, Solar Open,
    # GLM-5 (DSA) and MiniCPM-5-MoE (its router returns the top-k itself; same function)
    *(_Arch(block, package, package, _read_deepseek, _write_deepseek,
            router_fields=(("weight", "router.gate.weight"), ("e_score_correction_bias", "router.bias_E")),
            parts=(("gate", "router"), ("experts", "experts"), ("shared_experts", "shared")))
      for block, package in (("DeepseekV32MoE", "deepseek_v32"), ("Glm4MoeLiteMoE", "glm4_moe_lite"),
                             ("Glm4vMoeTextMoE", "glm4v_moe"), ("SolarOpenMoE", "solar_open"),
                             ("GlmMoeDsaMoE", "glm_moe_dsa"), ("MiniCPM5MoeMoE", "minicpm5_moe"))),
    # described by data (_Layout): gpt-oss, ERNIE-4.5-MoE, Hunyuan-MoE V1, PhiMoE, LongCat-Flash, Llama 4
    _Arch("GptOssMLP", "gpt_oss", "gpt_oss", _reader(_GPT_OSS), _writer(_GPT_OSS, "GptOssMLP"), router_attr="router",
          router_fields=(("weight", "router.gate.weight"), ("bias", "router.gate.bias")),
          parts=(("router", "router"), ("experts", "experts")), returns_tuple=True),
    _Arch("Ernie4_5_MoeSparseMoeBlock", "ernie4_5_moe", "ernie4_5_moe", _reader(_ERNIE),
          _writer(_ERNIE, "Ernie4_5_MoeSparseMoeBlock"),
          parts=(("gate", "router"), ("experts", "experts"), ("shared_experts", "shared"))),
    _Arch("HunYuanMoEV1Moe", "hunyuan_v1_moe", "hunyuan_v1_moe", _reader(_HUNYUAN),
          _writer(_HUNYUAN, "HunYuanMoEV1Moe"),
          router_fields=(("wg", "router.gate"),),
          parts=(("gate", "router"), ("experts", "experts"), ("shared_mlp", "shared"))),
    _Arch("PhimoeSparseMoeBlock", "phimoe", "phimoe", _reader(_PHIMOE), _writer(_PHIMOE, "PhimoeSparseMoeBlock"),
          router_attr="router", router_fields=(("weight", "router.gate.weight"), ("bias", "router.gate.bias")),
          parts=(("router", "router"), ("experts", "experts"))),
    _Arch("LongcatFlashMoE", "longcat_flash", "longcat_flash", _reader(_LONGCAT), _writer(_LONGCAT, "LongcatFlashMoE"),
          router_attr="router",
          router_fields=(("classifier", "router.gate"), ("e_score_correction_bias", "router.bias_E")),
          parts=(("router", "router"), ("experts", "experts"))),
    _Arch("Llama4TextMoe", "llama4", "llama4_text", _reader(_LLAMA4), _writer(_LLAMA4, "Llama4TextMoe"),
          router_attr="router", router_fields=(("weight", "router.gate.weight"), ("bias", "router.gate.bias")),
          parts=(("router", "router"), ("experts", "experts"), ("shared_expert", "shared")), returns_tuple=True,
          flat_output=True),
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


# MoE blocks of the installed transformers that no row converts, with what moekit lacks for them (none in 5.25)
NOT_CONVERTIBLE: dict[str, str] = {}


def _unsupported(what: str) -> ValueError:
    why = f" ({what} {NOT_CONVERTIBLE[what]})" if what in NOT_CONVERTIBLE else ""
    return ValueError(f"{what} is not a supported transformers MoE block{why}; supported: "
                      f"{', '.join(SUPPORTED_BLOCKS)}")


def not_convertible_blocks(model: nn.Module) -> list[str]:
    """``"<qualified name>: <class> <reason>"`` for each MoE block of ``model`` that is known not to convert."""
    return [f"{n}: {type(m).__name__} {NOT_CONVERTIBLE[type(m).__name__]}" for n, m in model.named_modules()
            if type(m).__name__ in NOT_CONVERTIBLE and type(m).__module__.startswith("transformers.")]


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
