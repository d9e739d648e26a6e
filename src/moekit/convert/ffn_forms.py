"""Where the dense FFN lives in a transformers block, found by *structure*, and how to swap it for an MoE.

A "form" recognises one way Hugging Face models write an FFN, reads its weights in moekit's layout
(``w1_FD``, ``w3_FD``, ``w2_DF``, biases, activation name) and knows which modules to replace so that the block
keeps computing ``block(x)`` with the FFN swapped:

========== ================================================ ============================================
form        modules                                          replaced by
========== ================================================ ============================================
glu         ``gate_proj``, ``up_proj``, ``down_proj``        the FFN module -> ``UpcycledFFN``
            (Llama, Mistral, Qwen2)
conv1d      ``c_fc``, ``c_proj`` (GPT-2 Conv1D) + dropout    the FFN module -> ``UpcycledFFN`` (+dropout)
lin         ``lin1``, ``lin2`` + dropout (DistilBERT)        the FFN module -> ``UpcycledFFN`` (+dropout)
fc          ``fc1``, ``fc2`` (ViT in transformers 5, CLIP)   the FFN module -> ``UpcycledFFN``
bert        ``intermediate.dense`` then ``output.dense``     ``intermediate`` -> ``UpcycledFFN`` and
            (BERT, RoBERTa, old ViT); BertOutput adds the    ``output.dense`` -> ``nn.Identity``, so BertOutput
            dropout, residual and LayerNorm                  still applies dropout, residual and LayerNorm
========== ================================================ ============================================

The activation is identified numerically (probed against moekit's activations), so ``gelu`` and ``gelu_new``
(tanh approximation) are told apart whatever class transformers uses for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..experts.activations import ACTIVATIONS

FORMS = ("glu", "conv1d", "lin", "fc", "bert")
_ACT_ATTRS = ("act_fn", "activation_fn", "activation", "act", "intermediate_act_fn")


@dataclass
class DenseWeights:
    """A dense FFN in moekit's layout: ``w2 @ (act(w1 x + b1) [* (w3 x + b3)]) + b2``."""

    w1_FD: Tensor
    w2_DF: Tensor
    activation: str
    w3_FD: Tensor | None = None
    b1_F: Tensor | None = None
    b3_F: Tensor | None = None
    b2_D: Tensor | None = None

    @property
    def dim(self) -> int:
        return self.w1_FD.shape[1]

    @property
    def hidden_dim(self) -> int:
        return self.w1_FD.shape[0]

    @property
    def glu(self) -> bool:
        return self.w3_FD is not None

    @property
    def bias(self) -> bool:
        return any(b is not None for b in (self.b1_F, self.b3_F, self.b2_D))


class UpcycledFFN(nn.Module):
    """What stands where the dense FFN was: ``dropout(moe(x))`` (dropout only where the dense FFN applied one)."""

    def __init__(self, moe: nn.Module, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        y = self.moe(x)
        return y if self.dropout is None else self.dropout(y)


@dataclass
class FFNSite:
    """One dense FFN found in a model: its module path, form, block index and weights."""

    name: str
    module: nn.Module
    form: str
    index: int | None = None

    def weights(self) -> DenseWeights:
        return _READERS[self.form](self.module)

    def dropout(self) -> nn.Module | None:
        d = getattr(self.module, "dropout", None) if self.form in ("conv1d", "lin") else None
        return d if isinstance(d, nn.Module) else None

    def install(self, replacement: UpcycledFFN, model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
        """Swap the replacement in; return ``(parent, attribute, original)`` triples that undo the swap."""
        if self.form == "bert":
            swaps = [(self.module, "intermediate", self.module.intermediate),
                     (self.module.output, "dense", self.module.output.dense)]
            self.module.intermediate = replacement
            self.module.output.dense = nn.Identity()
            return swaps
        parent_name, _, attr = self.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, attr)
        setattr(parent, attr, replacement)
        return [(parent, attr, original)]


def detect_form(m: nn.Module) -> str | None:
    """The form of module ``m`` if it is a dense FFN this module can read, else None."""
    if _has(m, "gate_proj", "up_proj", "down_proj") and _activation_module(m) is not None:
        return "glu"
    if _has(m, "c_fc", "c_proj") and _activation_module(m) is not None:
        return "conv1d"
    if _has(m, "lin1", "lin2") and _activation_module(m) is not None:
        return "lin"
    if _has(m, "fc1", "fc2") and _activation_module(m) is not None:
        return "fc"
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if (
        isinstance(getattr(inter, "dense", None), nn.Linear)
        and isinstance(getattr(out, "dense", None), nn.Linear)
        and _activation_module(inter) is not None
    ):
        return "bert"
    return None


def find_site_in_block(name: str, block: nn.Module, index: int | None) -> FFNSite | None:
    """The FFN of a transformer block: the block itself (bert form) or its ``mlp`` / ``ffn`` / ``feed_forward``."""
    if detect_form(block) == "bert":
        return FFNSite(name, block, "bert", index)
    for child in ("mlp", "ffn", "feed_forward"):
        m = getattr(block, child, None)
        if isinstance(m, nn.Module):
            form = detect_form(m)
            if form is not None:
                return FFNSite(f"{name}.{child}", m, form, index)
    return None


def _has(m: nn.Module, *names: str) -> bool:
    return all(hasattr(getattr(m, n, None), "weight") for n in names)


def _activation_module(m: nn.Module) -> Callable | None:
    for a in _ACT_ATTRS:
        f = getattr(m, a, None)
        if callable(f) and not isinstance(f, (nn.Linear, nn.Dropout)):
            return f
    return None


@torch.no_grad()
def activation_name(f: Callable) -> str:
    """moekit's name for the activation callable ``f``, found by evaluating it on a grid (float64)."""
    x = torch.linspace(-8.0, 8.0, 321, dtype=torch.float64)
    y = f(x).to(torch.float64)
    for name in ACTIVATIONS.names():
        if torch.allclose(ACTIVATIONS.get(name)(x), y, rtol=0.0, atol=1e-9):
            return name
    raise ValueError(
        f"upcycle: the dense FFN's activation {type(f).__name__} matches none of moekit's activations "
        f"({', '.join(ACTIVATIONS.names())}); register it in moekit.experts.ACTIVATIONS"
    )


def _linear(lin: nn.Module, transposed: bool = False) -> tuple[Tensor, Tensor | None]:
    """(weight as (out, in), bias) of an nn.Linear, or of a GPT-2 Conv1D (weight stored as (in, out))."""
    w = lin.weight.detach()
    b = None if getattr(lin, "bias", None) is None else lin.bias.detach()
    return (w.t() if transposed else w), b


def _read_glu(m: nn.Module) -> DenseWeights:
    w1, b1 = _linear(m.gate_proj)
    w3, b3 = _linear(m.up_proj)
    w2, b2 = _linear(m.down_proj)
    return DenseWeights(w1, w2, activation_name(_activation_module(m)), w3, b1, b3, b2)


def _read_two(first: nn.Module, second: nn.Module, act: Callable, transposed: bool = False) -> DenseWeights:
    w1, b1 = _linear(first, transposed)
    w2, b2 = _linear(second, transposed)
    return DenseWeights(w1, w2, activation_name(act), None, b1, None, b2)


_READERS: dict[str, Callable[[nn.Module], DenseWeights]] = {
    "glu": _read_glu,
    "conv1d": lambda m: _read_two(m.c_fc, m.c_proj, _activation_module(m), transposed=True),
    "lin": lambda m: _read_two(m.lin1, m.lin2, _activation_module(m)),
    "fc": lambda m: _read_two(m.fc1, m.fc2, _activation_module(m)),
    "bert": lambda m: _read_two(m.intermediate.dense, m.output.dense, _activation_module(m.intermediate)),
}
