"""Experts as stacked weight banks: ``w1_EFD`` (gate / input), ``w3_EFD`` (GLU up), ``w2_EDF`` (down).

One grouped computation runs every expert on its contiguous slice of the dispatched tokens. Fine-grained experts
(DeepSeekMoE) are a configuration: many experts with a small ``hidden_dim``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..ops.grouped import IMPLS, grouped_linear, grouped_mm_available
from ..spec import Spec, register_spec
from .activations import ACTIVATIONS


@dataclasses.dataclass(frozen=True, kw_only=True)
class FFN(Spec):
    """A feed-forward expert: ``w2 @ (act(w1 @ x) * (w3 @ x))`` when ``glu`` else ``w2 @ act(w1 @ x)``.

    Args:
        hidden_dim: hidden units per expert (default 4 * dim).
        activation: a name from ``moekit.experts.ACTIVATIONS`` (silu, gelu, gelu_tanh, relu).
        glu: gated linear unit (SwiGLU / GeGLU) with a third weight ``w3``.
        bias: biases on every projection.
        impl: ``"auto"`` (grouped_mm where the dtype allows, else a split loop), ``"grouped_mm"`` or ``"loop"``.
    """

    hidden_dim: int | None = None
    activation: str = "silu"
    glu: bool = True
    bias: bool = False
    impl: str = "auto"

    def __post_init__(self) -> None:
        ACTIVATIONS.get(self.activation)  # fails loudly on an unknown name
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"{type(self).__name__}: hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.impl not in IMPLS:
            raise ValueError(f"{type(self).__name__}: unknown impl {self.impl!r}; valid choices: {', '.join(IMPLS)}")

    def hidden(self, dim: int) -> int:
        return self.hidden_dim if self.hidden_dim is not None else 4 * dim

    def build(self, dim: int, num_experts: int) -> "ExpertBank":
        return ExpertBank(num_experts, dim, self.hidden(dim), self)

    def build_dense(self, dim: int) -> "DenseFFN":
        return DenseFFN(dim, self.hidden(dim), self)


@register_spec("swiglu", "experts")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SwiGLU(FFN):
    """SwiGLU experts (Mixtral, Qwen-MoE, DeepSeek)."""


@register_spec("mlp", "experts")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MLP(FFN):
    """Plain two-layer experts with a chosen activation (Switch, ViT MoE); biases on by default."""

    activation: str = "gelu"
    glu: bool = False
    bias: bool = True


def _init_bank(w: Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(w, -bound, bound)


class ExpertBank(nn.Module):
    """``forward(x_ND, counts_E) -> y_ND`` with rows grouped by expert in order 0..E-1."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, spec: FFN) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.act = ACTIVATIONS.get(spec.activation)
        E, D, Fh = num_experts, dim, hidden_dim
        self.w1_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.w3_EFD = nn.Parameter(torch.empty(E, Fh, D)) if spec.glu else None
        self.w2_EDF = nn.Parameter(torch.empty(E, D, Fh))
        self.b1_EF = nn.Parameter(torch.zeros(E, Fh)) if spec.bias else None
        self.b3_EF = nn.Parameter(torch.zeros(E, Fh)) if spec.bias and spec.glu else None
        self.b2_ED = nn.Parameter(torch.zeros(E, D)) if spec.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_bank(self.w1_EFD, self.dim)
        if self.w3_EFD is not None:
            _init_bank(self.w3_EFD, self.dim)
        _init_bank(self.w2_EDF, self.hidden_dim)
        for b in (self.b1_EF, self.b3_EF, self.b2_ED):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x_ND: Tensor, counts_E: Tensor, expert_N: Tensor | None = None) -> Tensor:
        impl = self.spec.impl
        if impl == "auto":  # decide once per call: every projection then takes the same path
            dims_ok = grouped_mm_available(x_ND.dtype, self.dim, self.hidden_dim)
            impl = "grouped_mm" if dims_ok and x_ND.shape[0] > 0 else "loop"
        offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32) if impl == "grouped_mm" else None
        counts_list = counts_E.tolist() if impl == "loop" else None
        if self.b1_EF is not None and expert_N is None:
            expert_N = torch.repeat_interleave(torch.arange(self.num_experts, device=x_ND.device), counts_E)

        def proj(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            y = grouped_linear(x, w, counts_E, offsets_E, counts_list, impl)
            return y if b is None else y + b[expert_N]

        h_NF = self.act(proj(x_ND, self.w1_EFD, self.b1_EF))
        if self.w3_EFD is not None:
            h_NF = h_NF * proj(x_ND, self.w3_EFD, self.b3_EF)
        return proj(h_NF, self.w2_EDF, self.b2_ED)

    def expert_forward(self, e: int, x_TD: Tensor) -> Tensor:
        """Run expert ``e`` alone on ``x_TD`` (reference and inspection; not the fast path)."""
        h = x_TD @ self.w1_EFD[e].T + (0 if self.b1_EF is None else self.b1_EF[e])
        h = self.act(h)
        if self.w3_EFD is not None:
            h = h * (x_TD @ self.w3_EFD[e].T + (0 if self.b3_EF is None else self.b3_EF[e]))
        return h @ self.w2_EDF[e].T + (0 if self.b2_ED is None else self.b2_ED[e])

    def extra_repr(self) -> str:
        s = self.spec
        return f"E={self.num_experts}, D={self.dim}, F={self.hidden_dim}, act={s.activation}, glu={s.glu}, bias={s.bias}"


class DenseFFN(nn.Module):
    """One dense FFN with the same parametrisation as one expert (shared experts, the benchmark floor)."""

    def __init__(self, dim: int, hidden_dim: int, spec: FFN) -> None:
        super().__init__()
        self.spec = spec
        self.dim, self.hidden_dim = dim, hidden_dim
        self.act = ACTIVATIONS.get(spec.activation)
        self.w1_FD = nn.Parameter(torch.empty(hidden_dim, dim))
        self.w3_FD = nn.Parameter(torch.empty(hidden_dim, dim)) if spec.glu else None
        self.w2_DF = nn.Parameter(torch.empty(dim, hidden_dim))
        self.b1_F = nn.Parameter(torch.zeros(hidden_dim)) if spec.bias else None
        self.b3_F = nn.Parameter(torch.zeros(hidden_dim)) if spec.bias and spec.glu else None
        self.b2_D = nn.Parameter(torch.zeros(dim)) if spec.bias else None
        _init_bank(self.w1_FD, dim)
        if self.w3_FD is not None:
            _init_bank(self.w3_FD, dim)
        _init_bank(self.w2_DF, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        F_ = torch.nn.functional
        h = self.act(F_.linear(x, self.w1_FD, self.b1_F))
        if self.w3_FD is not None:
            h = h * F_.linear(x, self.w3_FD, self.b3_F)
        return F_.linear(h, self.w2_DF, self.b2_D)

    def extra_repr(self) -> str:
        return f"D={self.dim}, F={self.hidden_dim}, act={self.spec.activation}, glu={self.spec.glu}"
