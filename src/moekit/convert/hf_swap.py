"""Swap every MoE block of a transformers model onto moekit in place, reversibly, keeping the model a good
transformers citizen.

What a swapped model keeps (see docs/hf.md, "A swapped model in transformers"):

- ``save_pretrained`` (of the model and of any sub-model such as ``model.base_model``) writes the original HF names and
  layout: the original block objects are put back for the duration of the save (after the moekit weights are written
  into them), so the directory loads in plain transformers and with ``swap_hf_moe`` again.
- ``post_init`` / ``init_weights``: HF's ``_init_weights`` matches routers and expert modules by ``isinstance``. Each
  adapter holds parameter-free *views* of the HF router class (which also re-emit the router logits for
  ``output_router_logits``) and, where the bank has HF's storage, of the HF experts class; their HF attribute names
  (``weight``, ``e_score_correction_bias``, ``gate_up_proj``, ``down_proj``) resolve to the moekit tensors, so HF's
  init writes into moekit's parameters.
- ``_keep_in_fp32_modules(_strict)`` and the TP/EP plans are rewritten on the instance: HF entries that only named a
  swapped block's internals are dropped, and ``e_score_correction_bias`` becomes ``bias_E``. Tensor parallelism over
  swapped blocks is declined: a TP-sharded model cannot be swapped (moekit parallelises experts with its own
  ``moekit.parallel``).
- ``set_experts_implementation`` warns that it has no effect on the swapped blocks (their experts are moekit's).

transformers is imported lazily, inside functions.
"""

from __future__ import annotations

import contextlib
import re
import types
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..layer import MoE
from .hf import SUPPORTED_BLOCKS, _Arch, _arch_of, from_hf, not_convertible_blocks, to_hf

# ---------------------------------------------------------------------------------------------- HF-class views


def _resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _view_init(self: nn.Module, refs: dict[str, tuple[Any, str]], index: int | None, plain: dict[str, Any]) -> None:
    nn.Module.__init__(self)
    object.__setattr__(self, "_moekit_refs", refs)
    self.index = index
    for k, v in plain.items():  # the HF module's plain settings (top_k, num_experts, ...), read by some HF code
        if k not in refs and not hasattr(type(self), k):
            self.__dict__[k] = v


def _view_getattr(self: nn.Module, name: str) -> Any:
    refs = self.__dict__.get("_moekit_refs")
    if refs is not None and name in refs:
        owner, path = refs[name]
        return _resolve(owner, path)
    return nn.Module.__getattr__(self, name)


def _view_forward(self: nn.Module, logits: Tensor) -> tuple:
    if self.index is None:
        raise RuntimeError(f"{type(self).__name__} is a parameter-free view of a swapped block; it is not callable")
    out: list[Tensor | None] = [None] * (self.index + 1)
    out[self.index] = logits
    return tuple(out)


def _view_repr(self: nn.Module) -> str:
    return "views=" + ",".join(self.__dict__.get("_moekit_refs", {}))


_VIEW_TYPES: dict[type, type] = {}


def _hf_view(hf_module: nn.Module, refs: dict[str, tuple[Any, str]], index: int | None = None) -> nn.Module:
    """A parameter-free module of ``hf_module``'s class whose HF attribute names resolve to moekit tensors.

    It is an instance of the HF class (transformers' output recorder and ``_init_weights`` match by ``isinstance``)
    but owns nothing: it adds no state-dict entry, and an in-place init through it writes the moekit tensor. With an
    ``index`` its forward re-emits the router logits at that tuple position (``output_router_logits``).
    """
    cls = type(hf_module)
    if cls not in _VIEW_TYPES:
        _VIEW_TYPES[cls] = type(f"MoekitView{cls.__name__}", (cls,), {
            "__init__": _view_init, "__getattr__": _view_getattr, "forward": _view_forward,
            "extra_repr": _view_repr, "__module__": __name__,
        })
    plain = {k: v for k, v in vars(hf_module).items()
             if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
    view = _VIEW_TYPES[cls](refs, index, plain)
    _copy_hooks(hf_module, view)
    return view


def _copy_hooks(src: nn.Module, dst: nn.Module) -> None:
    for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(dst, attr).update({k: v for k, v in getattr(src, attr).items() if k not in getattr(dst, attr)})


def _experts_refs(layer: MoE, original: nn.Module) -> dict[str, tuple[Any, str]] | None:
    """HF expert attribute -> moekit tensor of the same layout (what HF's ``_init_weights`` writes in place)."""
    bank, hf = layer.experts, getattr(original, "experts", None)
    if hf is None or not hasattr(hf, "gate_up_proj") or not hasattr(hf, "down_proj"):
        return None
    if getattr(bank, "w13_E2FD", None) is None:  # only a fused GLU bank has HF's gate_up_proj layout
        return None
    refs = {"gate_up_proj": (bank, "w13_E2FD"), "down_proj": (bank, "w2_EDF")}
    if getattr(bank, "b13_E2F", None) is not None:  # experts with biases (gpt-oss)
        refs |= {"gate_up_proj_bias": (bank, "b13_E2F"), "down_proj_bias": (bank, "b2_ED")}
    return refs


# ------------------------------------------------------------------------------------------------ the adapter

class HFBlockAdapter(nn.Module):
    """A moekit layer standing in for a transformers MoE block: called like the block, returns what it returns.

    ``moe`` is the :class:`moekit.MoE`; ``logits_tap`` (when present) is a parameter-free view of the HF router class
    that re-emits the router logits for transformers' ``output_router_logits`` and lets HF's ``_init_weights`` reach
    the moekit router; ``experts_view`` likewise lets it reach the expert bank; ``returns_tuple`` wraps the output as
    ``(hidden, router_logits)`` for blocks that return a tuple; ``flat_output`` returns (T, D) hidden states, as
    blocks that flatten their tokens do (Llama 4).
    """

    def __init__(self, moe: MoE, block_class: str, logits_tap: nn.Module | None = None, *, flat_logits: bool = True,
                 returns_tuple: bool = False, experts_view: nn.Module | None = None, flat_output: bool = False) -> None:
        super().__init__()
        self.moe = moe
        self.block_class = block_class
        self.logits_tap = logits_tap
        self.experts_view = experts_view
        self.flat_logits = flat_logits
        self.returns_tuple = returns_tuple
        self.flat_output = flat_output

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        tap = self.logits_tap is not None and getattr(self.logits_tap, "index", None) is not None
        if not (tap or self.returns_tuple):  # the plain call (which may take the fused decode path)
            y = self.moe(hidden_states)
            return y.reshape(-1, y.shape[-1]) if self.flat_output else y
        y, logits = self.moe.forward_and_logits(hidden_states)  # one native call at decode, logits included
        if logits is not None and not self.flat_logits:
            logits = logits.reshape(*hidden_states.shape[:-1], logits.shape[-1])
        if tap and logits is not None:
            self.logits_tap(logits)
        y = y.reshape(-1, y.shape[-1]) if self.flat_output else y
        return (y, logits) if self.returns_tuple else y

    def extra_repr(self) -> str:
        return f"replaces={self.block_class}"


# ------------------------------------------------------------------------------------------------- the handle

@dataclass
class _Swapped:
    parent: nn.Module
    name: str
    original: nn.Module
    adapter: HFBlockAdapter
    original_router: nn.Module | None
    qualname: str
    arch: _Arch


def _align(s: _Swapped) -> None:
    """Move each child of the original block to the dtype/device of the moekit part it maps to (a dtype or device
    move made after the swap then reaches the original too, and it never ends up with mixed dtypes)."""
    moe = s.adapter.moe
    for child_name, part in s.arch.parts:
        child, mine = getattr(s.original, child_name, None), getattr(moe, part, None)
        if child is None or mine is None:
            continue
        ref = next((t for t in [*mine.parameters(), *mine.buffers()] if t.is_floating_point()), None)
        if ref is None:
            continue
        if any(t.is_floating_point() and (t.dtype != ref.dtype or t.device != ref.device)
               for t in [*child.parameters(), *child.buffers()]):
            child.to(device=ref.device, dtype=ref.dtype)


class SwapHandle:
    """What :func:`swap_hf_moe` did; :meth:`revert` undoes it, :meth:`hf_modules` suspends it."""

    def __init__(self, model: nn.Module, swapped: list[_Swapped], share: bool) -> None:
        self.model = model
        self.swapped = swapped
        self.share = share
        self.active = True
        self._patched: list[nn.Module] = []
        self._plans: list[tuple[nn.Module, str, Any]] = []

    @property
    def names(self) -> list[str]:
        """Qualified names of the swapped blocks (``model.layers.0.mlp`` ...)."""
        return [s.qualname for s in self.swapped]

    @property
    def layers(self) -> list[MoE]:
        return [s.adapter.moe for s in self.swapped]

    def __len__(self) -> int:
        return len(self.swapped)

    @property
    def replaced_parameters(self) -> list[tuple[str, list[str]]]:
        """HF parameters that the swapped model trains through *other* Parameter objects (``share=True``: views of the
        same storage; ``share=False``: copies, i.e. every parameter), as (HF
        qualified name, moekit qualified names). An optimizer built before the swap must be rebuilt for these."""
        out = []
        for s in self.swapped:
            mine = {id(p): n for n, p in s.adapter.moe.named_parameters()}
            for n, p in s.original.named_parameters():
                if id(p) in mine or not p.requires_grad:  # a frozen one (ERNIE's selection bias) is not trained
                    continue
                users = [f"{s.qualname}.moe.{m}" for m, q in s.adapter.moe.named_parameters()
                         if self.share and q.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()]
                out.append((f"{s.qualname}.{n}", users))
        return out

    def _check(self, what: str) -> None:
        if not self.active:
            raise RuntimeError(f"{what}: this swap was already reverted")
        for s in self.swapped:
            if getattr(s.parent, s.name) is not s.adapter:
                raise RuntimeError(f"{what}: {type(s.parent).__name__}.{s.name} is no longer the moekit adapter that "
                                   "swap_hf_moe put there")

    def sync(self) -> None:
        """Write the moekit weights into the original blocks (a no-op where they share storage)."""
        for s in self.swapped:
            _align(s)
            to_hf(s.adapter.moe, s.original)

    @contextlib.contextmanager
    def hf_modules(self) -> Iterator[nn.Module]:
        """Within this context the model holds its original HF blocks again (with the current moekit weights): what
        ``save_pretrained`` uses, so that a swapped model saves HF's names and layout."""
        self._check("SwapHandle.hf_modules")
        self.sync()
        for s in self.swapped:
            setattr(s.parent, s.name, s.original)
        try:
            yield self.model
        finally:
            for s in self.swapped:
                setattr(s.parent, s.name, s.adapter)

    def revert(self, *, sync: bool = True) -> nn.Module:
        """Put the original block objects back. ``sync=True`` first writes the moekit weights into them (a no-op for
        shared storage), so training done after the swap is kept; the originals also follow a dtype/device move made
        after the swap."""
        self._check("revert_hf_moe")
        if sync:
            self.sync()
        for s in self.swapped:
            if s.original_router is not None and s.adapter.logits_tap is not None:
                _copy_hooks(s.adapter.logits_tap, s.original_router)
            s.original.train(s.adapter.training)
            setattr(s.parent, s.name, s.original)
        for m in self._patched:
            for attr in ("save_pretrained", "set_experts_implementation", "_moekit_swap"):
                m.__dict__.pop(attr, None)
        for owner, attr, value in self._plans:
            setattr(owner, attr, value)
        self.active = False
        return self.model


# ------------------------------------------------------------------------------- transformers model integration

def _swapped_save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` of a swapped model: saves the original HF blocks (HF names and layout)."""
    with self._moekit_swap.hf_modules():
        return type(self).save_pretrained(self, *args, **kwargs)


def _swapped_set_experts_implementation(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    handle = self._moekit_swap
    warnings.warn(f"set_experts_implementation: {len(handle)} MoE block(s) of this model are swapped onto moekit "
                  f"({', '.join(handle.names[:3])}{', ...' if len(handle) > 3 else ''}); their experts are moekit's "
                  "and ignore the HF experts implementation (revert_hf_moe(model) first to use it)", stacklevel=2)
    return type(self).set_experts_implementation(self, *args, **kwargs)


def _pattern(entry: str) -> re.Pattern:
    return re.compile(r"(?:^|\.)" + re.escape(entry).replace(r"\*", r"[^.]+") + r"(?:\.|$)")


def _rewrite_rules(handle: SwapHandle, sub: nn.Module, before: set[str]) -> None:
    """Drop plan / fp32 entries of ``sub`` that matched only swapped internals; rename HF names moekit renamed."""
    after = _names(sub)
    for attr in ("_tp_plan", "_ep_plan"):
        plan = sub.__dict__.get(attr)
        if not plan:
            continue
        kept = {k: v for k, v in plan.items()
                if any(_pattern(k).search(n) for n in after) or not any(_pattern(k).search(n) for n in before)}
        if kept != plan:
            handle._plans.append((sub, attr, plan))
            object.__setattr__(sub, attr, kept)
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        rules = sub.__dict__.get(attr)
        if not isinstance(rules, set) or not rules:
            continue
        new = set()
        for k in rules:
            if any(_pattern(k).search(n) for n in after) or not any(_pattern(k).search(n) for n in before):
                new.add(k)
            if k == "e_score_correction_bias":
                new.add("bias_E")  # moekit's name for DeepSeek's selection bias (TopK(correction_bias=True))
        new = {k for k in new if k != "bias_E" or any(_pattern(k).search(n) for n in after)}
        if new != rules:
            handle._plans.append((sub, attr, rules))
            object.__setattr__(sub, attr, new)


def _integrate(handle: SwapHandle, model: nn.Module, before: dict[int, set[str]]) -> None:
    """Patch every transformers sub-model that holds a swapped block (the model itself, ``base_model`` ...)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is what gives us these blocks
        return
    adapters = {id(s.adapter) for s in handle.swapped}
    for sub in model.modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        if not any(id(m) in adapters for m in sub.modules()):
            continue
        sub.__dict__["_moekit_swap"] = handle
        sub.__dict__["save_pretrained"] = types.MethodType(_swapped_save_pretrained, sub)
        sub.__dict__["set_experts_implementation"] = types.MethodType(_swapped_set_experts_implementation, sub)
        handle._patched.append(sub)
        _rewrite_rules(handle, sub, before.get(id(sub), set()))


def _names(sub: nn.Module) -> set[str]:
    return {n for n, _ in sub.named_parameters()} | {n for n, _ in sub.named_buffers()} | \
        {n for n, _ in sub.named_modules()}


def _check_not_tensor_parallel(model: nn.Module) -> None:
    tp = getattr(model, "_tp_size", None)
    dtensor = getattr(getattr(torch, "distributed", None), "tensor", None)
    DTensor = getattr(dtensor, "DTensor", None) if dtensor is not None else None
    sharded = DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())
    if (tp is not None and tp > 1) or sharded:
        raise ValueError("swap_hf_moe: this model is tensor-parallel (sharded by transformers' tp_plan); moekit does "
                         "not take over TP-sharded expert banks. Load it without tp_plan, swap, and parallelise the "
                         "experts with moekit.parallel (expert parallelism)")


def _router_recorders(model: nn.Module) -> list[tuple[type, int]]:
    """(router class, tuple index) pairs from which transformers records ``router_logits`` in this model."""
    out = []
    for m in model.modules():
        specs = getattr(type(m), "_can_record_outputs", None)
        rec = specs.get("router_logits") if isinstance(specs, dict) else None
        for r in rec if isinstance(rec, list) else [rec]:
            target = getattr(r, "target_class", None)
            if isinstance(target, type):
                out.append((target, int(getattr(r, "index", 0))))
    return out


def swap_hf_moe(model: nn.Module, *, share: bool = True) -> SwapHandle:
    """Replace every supported MoE block of a transformers model with a moekit layer computing the same function.

    ``share=True`` (default) reuses the weights' storage (no extra memory; see :func:`from_hf`); ``share=False`` copies.
    Returns a :class:`SwapHandle`; ``handle.revert()`` or :func:`revert_hf_moe` restores the original module objects.
    ``output_router_logits`` keeps working: each adapter re-emits its router logits through a view of the HF router's
    class. ``save_pretrained`` still writes HF's names and layout, ``post_init`` re-initialises the moekit tensors, and
    the fp32 / parallel-plan rules are rewritten (see the module docstring). Raises a ``ValueError`` if the model has
    no supported block, was already swapped, or is tensor-parallel.
    """
    if getattr(model, "_moekit_swap", None) is not None:
        raise ValueError("swap_hf_moe: this model is already swapped onto moekit; call revert_hf_moe(model) first")
    _check_not_tensor_parallel(model)
    found: list[tuple[nn.Module, str, str, nn.Module, _Arch]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            arch = _arch_of(child)
            if arch is not None:
                found.append((parent, name, prefix + name, child, arch))
            else:
                visit(child, prefix + name + ".")

    visit(model, "")
    if not found:
        known = not_convertible_blocks(model)
        why = f" ({known[0]}{f'; {len(known) - 1} more' if len(known) > 1 else ''})" if known else ""
        raise ValueError(f"swap_hf_moe: {type(model).__name__} has no supported MoE block{why}; supported: "
                         f"{', '.join(SUPPORTED_BLOCKS)}")
    if share and any(a.block_class == "SwitchTransformersSparseMLP" for *_, a in found):
        raise ValueError("swap_hf_moe: SwitchTransformers keeps one nn.Linear per expert, which moekit's stacked bank "
                         "cannot share; pass share=False to copy the weights")
    before = {id(m): _names(m) for m in model.modules()
              if hasattr(m, "_tp_plan") or hasattr(m, "_keep_in_fp32_modules")}
    recorders = _router_recorders(model)
    swapped = []
    for parent, name, qualname, block, arch in found:
        layer = from_hf(block, share=share)
        router = getattr(block, arch.router_attr)
        index = next((i for cls, i in recorders if isinstance(router, cls)), None)
        tap = _hf_view(router, {hf: (layer, path) for hf, path in arch.router_fields}, index)
        refs = _experts_refs(layer, block)
        experts_view = _hf_view(block.experts, refs) if refs is not None else None
        adapter = HFBlockAdapter(layer, type(block).__name__, tap, flat_logits=arch.flat_logits,
                                 returns_tuple=arch.returns_tuple, experts_view=experts_view,
                                 flat_output=arch.flat_output)
        adapter.train(block.training)
        initialised = bool(getattr(block, "_is_hf_initialized", False))
        for m in adapter.modules():  # HF's init skips what was initialised (as it would skip the original block)
            m._is_hf_initialized = initialised
        setattr(parent, name, adapter)
        swapped.append(_Swapped(parent, name, block, adapter, router, qualname, arch))
    handle = SwapHandle(model, swapped, share)
    model.__dict__["_moekit_swap"] = handle
    _integrate(handle, model, before)
    if share and handle.replaced_parameters:
        warnings.warn(
            f"swap_hf_moe(share=True): {len(handle.replaced_parameters)} HF Parameter(s) (e.g. "
            f"{handle.replaced_parameters[0][0]}) are now trained through new moekit Parameters viewing the same "
            "storage; an optimizer built before the swap does not update them: build optimizers after the swap "
            "(handle.replaced_parameters lists each HF name with its moekit replacements)", stacklevel=2)
    return handle


def revert_hf_moe(model: nn.Module, *, sync: bool = True) -> nn.Module:
    """Undo :func:`swap_hf_moe` on ``model`` (see :meth:`SwapHandle.revert`)."""
    handle = getattr(model, "_moekit_swap", None)
    if handle is None:
        raise ValueError("revert_hf_moe: this model was not swapped with swap_hf_moe (or was already reverted)")
    out = handle.revert(sync=sync)
    model.__dict__.pop("_moekit_swap", None)
    return out


__all__ = ["HFBlockAdapter", "SwapHandle", "revert_hf_moe", "swap_hf_moe"]
