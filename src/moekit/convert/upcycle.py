"""Upcycling: turn the dense FFNs of a (Hugging Face) transformer into moekit MoE layers, in place and reversibly.

    cfg = UpcycleConfig(num_experts=4, router=TopK(k=2), init="copy", layers=[1, 3, 5])
    handle = upcycle_(model, cfg)       # model now has MoE layers; its function is unchanged at init
    ...train...
    revert(model)                       # the original dense module objects are back

Initialisations (``init``):

- ``"copy"``: every expert is a copy of the dense FFN (sparse upcycling, Komatsuzaki et al. 2023), optionally with
  Gaussian noise of ``noise`` times each weight's standard deviation. With combine weights that sum to one
  (``TopK(k, normalize=True)``, or ``UnitGate(TopK(k=1))`` for Switch) the MoE computes the dense FFN exactly.
- ``"split"``: the F hidden neurons are cut into E contiguous slices of F/E neurons, one per expert, and the output
  bias is shared as ``b2 / E`` (MoEfication, Zhang et al. 2022). With every slice active and unit weights
  (``UnitGate(TopK(k=E))``) the experts add up to the dense FFN exactly; with k < E it is an approximation.
- ``"random"``: experts of the dense FFN's size drawn from N(0, std of the matching dense weight), zero biases.
- ``"cluster"``: like ``"split"``, but each expert's F/E neurons are a cluster of a balanced k-means on the neurons'
  gate weights, and the router starts at the clusters' mean gate rows (MoEfication; see ``moekit.convert.moefy``,
  whose ``moefy_`` also clusters on calibration activations and fits the routers to them).

Which FFNs (``layers``): ``None`` (every block), block indices (negative counts from the end), a regular expression
searched in the FFN's module name, a list of exact module names, or ``filter_fn(name, module) -> bool``. Block
locations are known for the model types in :data:`BLOCK_PATTERNS`; for other models a pattern or a filter selects the
FFN modules, which must have one of the forms of :mod:`moekit.convert.ffn_forms`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..balance.specs import SwitchLoss
from ..dispatch.local import Dropless
from ..experts.bank import MLP, SwiGLU
from ..layer import MoE
from ..routers.base import RouterSpec
from ..routers.topk import TopK
from ..spec import resolve, spec_from_dict
from ..stats import _moe_layers
from .ffn_forms import DenseWeights, FFNSite, UpcycledFFN, detect_form, find_site_in_block
from .unit_gate import UnitGate

INITS = ("copy", "split", "random", "cluster")
HANDLE_ATTR = "_moekit_upcycle"

# model_type -> regular expression of the transformer blocks' module names (group 1: the block index)
_ENCODER = r"(?:encoder\.layer|layers)\.(\d+)"  # transformers 5 moved ViT's blocks to ``vit.layers``
_DECODER = r"layers\.(\d+)"
BLOCK_PATTERNS: dict[str, str] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "vit": _ENCODER,
    "distilbert": r"transformer\.layer\.(\d+)",
    "gpt2": r"h\.(\d+)",
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
}


@dataclass(frozen=True, kw_only=True)
class UpcycleConfig:
    """How to upcycle. Every field is plain data, so the config is saved with the model (see ``upcycle_io``).

    Args:
        num_experts: experts per MoE layer (E).
        router: router spec. ``TopK(k=2)`` (renormalised) keeps copy-init exact; for Switch use
            ``UnitGate(TopK(k=1))``, for an exact neuron split ``UnitGate(TopK(k=num_experts))``.
        init: ``"copy"``, ``"split"`` or ``"random"`` (see the module docstring).
        noise: copy init only: Gaussian noise of ``noise * std(W)`` added to each expert's copy of ``W``.
        layers: ``None`` (all blocks), block indices, a regex, a list of module names, or ``filter_fn(name, module)``.
        dispatch: ``Dropless()`` (exact) or ``Capacity(...)`` (drops overflow tokens).
        balance: balance specs of each MoE layer (default the Switch load-balancing loss, coefficient 0.01).
        router_std: the router's weights start as N(0, router_std^2); 0 gives a uniform router.
        seed: seeds the noise, the random experts and the router initialisation.
    """

    num_experts: int
    router: Any = field(default_factory=lambda: TopK(k=2))
    init: str = "copy"
    noise: float = 0.0
    layers: Any = None
    dispatch: Any = field(default_factory=Dropless)
    balance: Any = (SwitchLoss(coef=0.01),)
    router_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"UpcycleConfig: num_experts must be >= 1, got {self.num_experts}")
        if self.init not in INITS:
            raise ValueError(f"UpcycleConfig: unknown init {self.init!r}; valid choices: {', '.join(INITS)}")
        if self.noise < 0:
            raise ValueError(f"UpcycleConfig: noise must be >= 0, got {self.noise}")
        if self.noise > 0 and self.init != "copy":
            raise ValueError(f"UpcycleConfig: noise applies to init='copy' only, got init={self.init!r}")
        if self.router_std < 0:
            raise ValueError(f"UpcycleConfig: router_std must be >= 0, got {self.router_std}")
        router = resolve("router", self.router)
        if not isinstance(router, RouterSpec):
            raise TypeError(f"UpcycleConfig: router must be a router spec (e.g. TopK(k=2)), got {type(router).__name__}")
        router.validate(self.num_experts)
        object.__setattr__(self, "router", router)
        object.__setattr__(self, "dispatch", resolve("dispatch", self.dispatch))
        balance = self.balance if isinstance(self.balance, (list, tuple)) else (self.balance,)
        object.__setattr__(self, "balance", tuple(resolve("balance", b) for b in balance))
        layers = self.layers
        if isinstance(layers, (list, tuple)):
            if not all(isinstance(i, int) for i in layers) and not all(isinstance(i, str) for i in layers):
                raise TypeError("UpcycleConfig: layers must be all block indices (int) or all module names (str)")
            layers = tuple(layers)
        elif layers is not None and not isinstance(layers, str) and not callable(layers):
            raise TypeError(
                "UpcycleConfig: layers must be None, block indices, a name pattern (str), a list of module names "
                f"or a filter_fn(name, module), got {type(layers).__name__}"
            )
        object.__setattr__(self, "layers", layers)

    def to_dict(self) -> dict[str, Any]:
        if callable(self.layers) and not isinstance(self.layers, str):
            raise TypeError(
                "UpcycleConfig.to_dict: layers is a filter function, which cannot be serialized; "
                "save_upcycled stores the selected module names instead"
            )
        return {
            "num_experts": self.num_experts,
            "router": self.router.to_dict(),
            "init": self.init,
            "noise": self.noise,
            "layers": list(self.layers) if isinstance(self.layers, tuple) else self.layers,
            "dispatch": self.dispatch.to_dict(),
            "balance": [b.to_dict() for b in self.balance],
            "router_std": self.router_std,
            "seed": self.seed,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> UpcycleConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(UpcycleConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"UpcycleConfig: unknown fields {sorted(unknown)}; valid: {sorted(known)}")
        if isinstance(d.get("router"), dict):
            d["router"] = spec_from_dict("router", d["router"])
        if isinstance(d.get("dispatch"), dict):
            d["dispatch"] = spec_from_dict("dispatch", d["dispatch"])
        d["balance"] = tuple(spec_from_dict("balance", b) for b in d.get("balance", ()))
        return UpcycleConfig(**d)


@dataclass
class UpcycleHandle:
    """What :func:`upcycle_` did: the config, the replaced FFN sites, and what :meth:`revert` needs to undo it.

    The original dense modules are kept here (not inside the model, so they are neither trained nor saved).
    """

    config: UpcycleConfig
    sites: list[str]
    forms: list[str]
    indices: list[int | None]
    model_type: str | None
    _model: nn.Module = field(repr=False)
    _swaps: list[tuple[nn.Module, str, nn.Module]] = field(repr=False)

    def moe_layers(self) -> dict[str, MoE]:
        """The MoE layers, keyed by the name of the FFN site they replaced."""
        out = {}
        for name, form in zip(self.sites, self.forms):
            ffn = self._model.get_submodule(f"{name}.intermediate" if form == "bert" else name)
            out[name] = ffn.moe
        return out

    def revert(self) -> None:
        """Put the original dense modules back (moved to the device and dtype of what replaced them)."""
        if getattr(self._model, HANDLE_ATTR, None) is not self:
            raise RuntimeError("revert: this upcycle handle is no longer active on its model")
        ref = next(iter(self._model.parameters()), None)
        for parent, attr, original in reversed(self._swaps):
            ref = next(iter(getattr(parent, attr).parameters()), ref)
            if ref is not None:
                original.to(device=ref.device, dtype=ref.dtype)
            setattr(parent, attr, original)
        delattr(self._model, HANDLE_ATTR)


def upcycle_(model: nn.Module, cfg: UpcycleConfig) -> UpcycleHandle:
    """Replace the selected dense FFNs of ``model`` by MoE layers, in place. Returns the handle (also kept on the
    model, see :func:`get_upcycle`); :func:`revert` undoes it."""
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise ValueError("upcycle_: the model is already upcycled; call moekit.convert.upcycle.revert(model) first")
    sites = select_sites(model, cfg.layers)
    gen = torch.Generator().manual_seed(cfg.seed)
    replacements = [(site, _build_moe(site.weights(), cfg, gen, site.name)) for site in sites]
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for site, moe in replacements:  # build everything first: an error above leaves the model untouched
        swaps += site.install(UpcycledFFN(moe, site.dropout()), model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    handle = UpcycleHandle(
        cfg, [s.name for s in sites], [s.form for s in sites], [s.index for s in sites], model_type, model, swaps
    )
    object.__setattr__(model, HANDLE_ATTR, handle)
    return handle


def revert(model: nn.Module) -> None:
    """Undo :func:`upcycle_`: the original dense FFN module objects are put back."""
    handle = get_upcycle(model)
    if handle is None:
        raise ValueError("revert: the model is not upcycled")
    handle.revert()


def get_upcycle(model: nn.Module) -> UpcycleHandle | None:
    """The active upcycle handle of ``model``, or None."""
    return getattr(model, HANDLE_ATTR, None)


def train_only_moe_(
    model: nn.Module, *, router: bool = True, experts: bool = True, extra: Sequence[str] = ()
) -> list[str]:
    """Freeze everything but the MoE routers and/or experts (and parameters whose name matches a regex in
    ``extra``, e.g. ``"classifier"``). Returns the names of the parameters left trainable."""
    keep: set[int] = set()
    layers = list(_moe_layers(model))
    if not layers:
        raise ValueError("train_only_moe_: the model has no MoE layers")
    for _, m in layers:
        parts = ([m.router] if router else []) + ([m.experts] if experts else [])
        keep.update(id(p) for part in parts for p in part.parameters())
    patterns = [re.compile(p) for p in extra]
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in keep or any(pat.search(name) for pat in patterns))
        if p.requires_grad:
            trainable.append(name)
    return trainable


# --- which FFNs ------------------------------------------------------------------------------------------------


def select_sites(model: nn.Module, layers: Any) -> list[FFNSite]:
    """Resolve ``layers`` (see :class:`UpcycleConfig`) to the dense FFN sites of ``model``."""
    if isinstance(layers, list):
        layers = tuple(layers)
    if isinstance(layers, tuple) and layers and isinstance(layers[0], str):
        return [_site_by_name(model, name) for name in layers]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    pattern = BLOCK_PATTERNS.get(model_type)
    if pattern is None:
        if layers is None or isinstance(layers, tuple):
            raise ValueError(
                f"upcycle: no known FFN location for {type(model).__name__} (model_type={model_type!r}); known model "
                f"types: {', '.join(BLOCK_PATTERNS)}. Pass layers= a name pattern or a filter_fn(name, module) that "
                "selects the FFN modules"
            )
        sites = [FFNSite(n, m, f) for n, m in model.named_modules() if (f := detect_form(m)) is not None]
    else:
        sites = _known_sites(model, pattern, model_type)
        if isinstance(layers, tuple):
            sites = _by_index(sites, layers)
    if isinstance(layers, str):
        sites = [s for s in sites if re.search(layers, s.name)]
    elif callable(layers):
        sites = [s for s in sites if layers(s.name, s.module)]
    if not sites:
        raise ValueError(f"upcycle: layers={layers!r} selects no dense FFN in {type(model).__name__}")
    return sites


def _known_sites(model: nn.Module, pattern: str, model_type: str) -> list[FFNSite]:
    block_re = re.compile(rf"(?:.*\.)?{pattern}")
    sites = []
    for name, m in model.named_modules():
        match = block_re.fullmatch(name)
        if match is None:
            continue
        site = find_site_in_block(name, m, int(match.group(1)))
        if site is None:
            raise ValueError(
                f"upcycle: block {name!r} of {type(model).__name__} (model_type={model_type!r}) has no dense FFN of a "
                "known form (glu, conv1d, lin, fc, bert); it may already be an MoE"
            )
        sites.append(site)
    if not sites:
        raise ValueError(f"upcycle: found no transformer blocks matching {pattern!r} in {type(model).__name__}")
    return sorted(sites, key=lambda s: s.index)


def _by_index(sites: list[FFNSite], indices: tuple[int, ...]) -> list[FFNSite]:
    n = len(sites)
    chosen = []
    for i in indices:
        if not -n <= i < n:
            raise ValueError(f"upcycle: layer index {i} out of range: the model has {n} blocks (0..{n - 1})")
        j = i % n
        if j not in chosen:
            chosen.append(j)
    return [sites[j] for j in sorted(chosen)]


def _site_by_name(model: nn.Module, name: str) -> FFNSite:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"upcycle: {type(model).__name__} has no module named {name!r}") from None
    form = detect_form(m)
    if form is None:
        raise ValueError(f"upcycle: module {name!r} ({type(m).__name__}) is not a dense FFN of a known form")
    return FFNSite(name, m, form)


# --- building and initialising one MoE --------------------------------------------------------------------------


def _build_moe(dw: DenseWeights, cfg: UpcycleConfig, gen: torch.Generator, site: str) -> MoE:
    E, F_ = cfg.num_experts, dw.hidden_dim
    if cfg.init in ("split", "cluster") and F_ % E:
        raise ValueError(
            f"upcycle: init={cfg.init!r} needs num_experts={E} to divide the FFN hidden size {F_} (at {site!r})"
        )
    hidden = F_ // E if cfg.init in ("split", "cluster") else F_
    kind = SwiGLU if dw.glu else MLP
    experts = kind(hidden_dim=hidden, activation=dw.activation, bias=dw.bias)
    moe = MoE(dw.dim, E, router=cfg.router, experts=experts, dispatch=cfg.dispatch, balance=cfg.balance)
    if cfg.init == "cluster":  # neurons clustered into experts, router from the clusters (convert/moefy.py)
        from .moefy import init_cluster_

        _init_router(moe.router, cfg.router_std, gen)
        init_cluster_(moe, dw, cfg, gen)
    else:
        _INITS[cfg.init](moe.experts, dw, cfg, gen)
        _init_router(moe.router, cfg.router_std, gen)
    ref = dw.w1_FD
    return moe.to(device=ref.device, dtype=ref.dtype)


def _dense_tensors(dw: DenseWeights) -> dict[str, Tensor | None]:
    """Dense weights keyed by the expert bank's tensors (bank layout without the E axis), float32. The input
    projections are named by the bank's views (``gate_EFD`` / ``up_EFD`` of the fused ``w13_E2FD``), written in
    place."""
    f = lambda t: None if t is None else t.detach().to("cpu", torch.float32)
    return {"gate_EFD": f(dw.w1_FD), "up_EFD": f(dw.w3_FD), "w2_EDF": f(dw.w2_DF),
            "gate_bias_EF": f(dw.b1_F), "up_bias_EF": f(dw.b3_F), "b2_ED": f(dw.b2_D)}


@torch.no_grad()
def _init_copy(bank: nn.Module, dw: DenseWeights, cfg: UpcycleConfig, gen: torch.Generator) -> None:
    for name, dense in _dense_tensors(dw).items():
        p = getattr(bank, name)
        if p is None:
            continue
        if dense is None:  # a bias the dense FFN lacks (another projection has one): zero keeps it exact
            p.zero_()
            continue
        p.copy_(dense.expand_as(p))
        if cfg.noise > 0 and dense.numel() > 1:
            p.add_(torch.randn(p.shape, generator=gen) * (cfg.noise * float(dense.std())))


@torch.no_grad()
def _init_split(bank: nn.Module, dw: DenseWeights, cfg: UpcycleConfig, gen: torch.Generator) -> None:
    E = cfg.num_experts
    for name, dense in _dense_tensors(dw).items():
        p = getattr(bank, name)
        if p is None:
            continue
        if dense is None:
            p.zero_()
        elif name == "b2_ED":  # the output bias is added once in total when every expert is active
            p.copy_((dense / E).expand_as(p))
        elif name == "w2_EDF":  # (D, F) -> E slices of columns
            p.copy_(dense.reshape(dense.shape[0], E, -1).permute(1, 0, 2))
        else:  # w1/w3 (F, D) -> E slices of rows; b1/b3 (F,) -> E slices
            p.copy_(dense.reshape(E, -1, *dense.shape[1:]))


@torch.no_grad()
def _init_random(bank: nn.Module, dw: DenseWeights, cfg: UpcycleConfig, gen: torch.Generator) -> None:
    for name, dense in _dense_tensors(dw).items():
        p = getattr(bank, name)
        if p is None:
            continue
        if "bias" in name or name.startswith("b") or dense is None:
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * float(dense.std()))


_INITS: dict[str, Callable] = {"copy": _init_copy, "split": _init_split, "random": _init_random}


@torch.no_grad()
def _init_router(router: nn.Module, std: float, gen: torch.Generator) -> None:
    for m in router.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
            if m.bias is not None:
                m.bias.zero_()


__all__ = [
    "BLOCK_PATTERNS", "INITS", "UnitGate", "UpcycleConfig", "UpcycleHandle", "get_upcycle", "revert",
    "select_sites", "train_only_moe_", "upcycle_",
]
