"""Build an HF causal LM from a checkpoint directory with every non-expert weight in memory and every expert on disk.

The model is constructed on the meta device (buffers such as rotary frequencies are real), the non-expert tensors
are read into it, and each experts module (any class decorated with transformers' ``use_experts_implementation``)
is replaced by an :class:`~moekit.offload.experts.OffloadedExperts` that reads routed experts through one shared,
byte-bounded cache. Everything that can be wrong with the checkpoint or the arguments is checked here, before the
first token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .budget import parse_budget
from .experts import OffloadedExperts
from .layout import checkpoint_prefixes, expert_params, find_source
from .prefetch import Prefetcher
from .proxy import resolve_inner
from .reader import CheckpointError, CheckpointIndex
from .runtime import OffloadRuntime, QuantConfig


def is_hf_experts(m: torch.nn.Module) -> bool:
    """An instance of a class decorated with ``use_experts_implementation`` (it sets these attributes)."""
    return hasattr(m, "is_concatenated") and hasattr(m, "_is_expert_parallel") and hasattr(m, "num_experts")


def find_experts_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_hf_experts(m)]


def _router_of(model: torch.nn.Module, experts_path: str, E: int) -> torch.nn.Module | None:
    parent = model.get_submodule(experts_path.rsplit(".", 1)[0]) if "." in experts_path else model
    for name in ("gate", "router"):
        r = getattr(parent, name, None)
        w = getattr(r, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == E:
            return r
    return None


@dataclass
class OffloadedModel:
    """The model (call ``generate`` / ``forward`` on ``model``) and the runtime that serves its experts."""

    model: torch.nn.Module
    runtime: OffloadRuntime
    non_expert_bytes: int
    total_expert_bytes: int
    budget_bytes: int

    @property
    def cache(self):
        return self.runtime.cache

    def stats(self) -> dict:
        rt = self.runtime
        if rt.prefetcher is not None:
            rt.prefetcher.drain()
        out = {"cache": rt.cache.stats.as_dict(), "cache_bytes": rt.cache.used_bytes, "budget_bytes": self.budget_bytes,
               "non_expert_bytes": self.non_expert_bytes, "total_expert_bytes": self.total_expert_bytes,
               "lowbit_bytes": rt.lowbit_bytes(), "lowbit_served": rt.lowbit_served}
        if rt.prefetcher is not None:
            out["prefetch"] = rt.prefetcher.stats.as_dict()
        return out

    def close(self) -> None:
        if self.runtime.prefetcher is not None:
            self.runtime.prefetcher.close()


def load_offloaded(model_dir: str | os.PathLike, expert_budget: int | str = "25%", *, policy: str = "lru",
                   policy_kwargs: dict | None = None, prefetch: bool = False, quant: str | QuantConfig | None = None,
                   inner="auto", dtype: torch.dtype | None = None, pin: list[tuple[int, int]] | None = None,
                   working_bytes: int | None = None, pregate: dict | None = None) -> OffloadedModel:
    """Load ``model_dir`` (a ``save_pretrained`` directory) with experts served from disk.

    ``expert_budget``: bytes of expert weights kept in memory ("25%" of all expert bytes, or a byte count).
    ``policy``: "lru" | "lfu" | "activation" or a policy object. ``prefetch``: speculative next-layer loading.
    ``quant``: None (exact), "int8", "int4", or a :class:`QuantConfig`. ``inner``: the experts implementation run
    on the touched experts ("auto", "eager", "grouped_mm", a registered name or a callable). ``pin``: expert keys
    ``(layer, e)`` loaded up front and never evicted. ``pregate``: ``{layer: module}`` predictors of that layer's
    experts from the previous layer's input (Pre-gated MoE; :func:`moekit.offload.pregate.train_pregate`), used by
    the prefetcher instead of reusing the layer's router.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = str(model_dir)
    if isinstance(quant, str) or quant is None:
        if quant not in (None, "int8", "int4"):
            raise ValueError(f"quant={quant!r}: expected None, 'int8', 'int4' or a QuantConfig")
        quant = QuantConfig(bits=quant)
    index = CheckpointIndex(model_dir)  # validates every shard up front
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model_dir={model_dir!r}: config.json cannot be loaded: {e}") from e
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    experts = find_experts_modules(model)
    if not experts:
        raise ValueError(f"model_dir={model_dir!r}: {type(model).__name__} has no experts module decorated with "
                         f"transformers' use_experts_implementation; nothing to offload")

    # --- expert sources (every expert tensor must be present) ---
    sources, layer_of = {}, {}
    for L, (path, m) in enumerate(experts):
        sources[L] = find_source(index, path, m)
        layer_of[path] = L
    runtime_dtype = dtype
    expert_names = {f"{path}.{p}" for path, m in experts for p in expert_params(m)}

    # --- non-expert weights ---
    sd_meta = model.state_dict()
    tied = set()
    if getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False):
        tied = {k for k in sd_meta if k.startswith("lm_head.")}
    state, non_expert_bytes = {}, 0
    for name, t in sd_meta.items():
        if name in expert_names:
            continue
        ck = next((c for c in checkpoint_prefixes(name) if c in index), None)
        if ck is None:
            if name in tied:
                continue
            if t.device.type != "meta":
                continue  # a buffer computed at construction (not saved)
            raise CheckpointError(f"checkpoint {model_dir} lacks tensor {name!r} (shape {tuple(t.shape)})")
        v = index.read(ck)
        if tuple(v.shape) != tuple(t.shape):
            raise CheckpointError(f"tensor {ck!r} in {index.entry(ck).file} has shape {tuple(v.shape)}, the model "
                                  f"expects {tuple(t.shape)}")
        state[name] = v.to(t.dtype)
        non_expert_bytes += state[name].nbytes

    rt = OffloadRuntime(sources, runtime_dtype, budget_bytes=1, quant=quant)
    total = rt.total_expert_bytes()
    biggest = max(range(len(sources)), key=rt.expert_bytes)
    one_expert = rt._load((biggest, 0))[0].nbytes  # as stored (quantised if asked)
    budget_bytes = parse_budget(expert_budget, total, one_expert)
    rt = OffloadRuntime(sources, runtime_dtype, budget_bytes, policy, dict(policy_kwargs or {}), quant, working_bytes)
    if policy == "activation":
        rt.cache.policy.num_layers = len(sources)
    if working_bytes is None:
        top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
        rt.working_bytes = max(budget_bytes // 50, top_k * max(rt.expert_bytes(L) for L in sources))

    # --- swap in offloaded experts, then load the rest ---
    for path, m in experts:
        L = layer_of[path]
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        nxt = L + 1 if L + 1 < len(experts) else None
        fn, zero_copy = resolve_inner(inner, m)
        setattr(parent, attr, OffloadedExperts(m, L, rt, fn, nxt, zero_copy=zero_copy))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise CheckpointError(f"internal: unexpected tensors {unexpected[:5]}")
    if tied:
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"checkpoint {model_dir} lacks tensors {left[:5]}")
    model.eval()

    if pregate is not None:
        if not prefetch:
            raise ValueError("pregate= predicts experts for prefetching; pass prefetch=True with it")
        for L, pg in pregate.items():
            w = getattr(pg, "weight", None)
            if L not in sources or L == 0:
                raise ValueError(f"pregate: layer {L} is not an experts layer after the first "
                                 f"(layers 1..{len(sources) - 1})")
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != sources[L].num_experts:
                raise ValueError(f"pregate[{L}]: expected a module with a weight [{sources[L].num_experts}, hidden], "
                                 f"got {None if w is None else tuple(w.shape)}")
    if prefetch:
        routers, top_k = {}, {}
        for path, m in experts:
            L = layer_of[path]
            routers[L] = _router_of(model, path, m.num_experts)
            top_k[L] = int(getattr(routers[L], "top_k", getattr(config, "num_experts_per_tok", 1)) or 1)
        for L, pg in (pregate or {}).items():  # Pre-gated MoE: a trained predictor instead of router reuse
            routers[L] = pg
        per_layer_capacity = budget_bytes // max(rt.expert_bytes(L) for L in sources)
        rt.prefetcher = Prefetcher(rt.cache, routers, top_k, max_experts=max(1, per_layer_capacity // 2))
    if quant.lowbit_on_miss:
        rt.build_lowbit()
    if pin:
        for L, e in pin:
            if L not in sources or not 0 <= e < sources[L].num_experts:
                raise ValueError(f"pin: expert {(L, e)} does not exist ({len(sources)} expert layers)")
        rt.cache.pin(pin)
    return OffloadedModel(model, rt, non_expert_bytes, total, budget_bytes)


