"""Clamped SwiGLU experts (OpenAI gpt-oss): ``w2 @ ((clamp(u, -l, l) + 1) * g * sigmoid(alpha * g))`` with
``g = clamp(gate, max=l)``, ``u`` the up projection, ``l = limit`` (7.0 in gpt-oss) and ``alpha`` 1.702.

The bank is moekit's :class:`~moekit.experts.bank.ExpertBank` (grouped matmuls, decode path, biases) with only the
GLU replaced. ``interleaved=True`` keeps the gate and up rows of the fused input projection ``w13_E2FD`` interleaved
(``[g0, u0, g1, u1, ...]``, gpt-oss's ``gate_up_proj`` layout) instead of moekit's ``[gate; up]`` halves; the
``gate_EFD`` / ``up_EFD`` views follow the layout, so readers of the bank see the same experts either way.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from ..spec import register_spec
from .bank import FFN, ExpertBank
from .glu_fn import clamped_swiglu, native_swiglu

__all__ = ["ClampedSwiGLU", "ClampedSwiGLUBank", "clamped_swiglu"]


@register_spec("clamped_swiglu", "experts")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ClampedSwiGLU(FFN):
    """gpt-oss's clamped SwiGLU experts (biases on by default, as in gpt-oss).

    Args:
        alpha: the sigmoid's slope, ``g * sigmoid(alpha * g)``.
        limit: the gate is clamped to ``<= limit`` and the up projection to ``[-limit, limit]``.
        interleaved: gate and up rows interleaved in ``w13_E2FD`` (gpt-oss) instead of the ``[gate; up]`` halves.
    """

    bias: bool = True
    alpha: float = 1.702
    limit: float = 7.0
    interleaved: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.glu:
            raise ValueError("ClampedSwiGLU: glu must be True (it is a gated unit)")
        if self.activation not in ("silu", "swish"):
            raise ValueError(f"ClampedSwiGLU: the gate is g * sigmoid(alpha * g); activation must be 'silu', got "
                             f"{self.activation!r}")
        if not self.limit > 0:
            raise ValueError(f"ClampedSwiGLU: limit must be > 0, got {self.limit}")

    def build(self, dim: int, num_experts: int) -> "ClampedSwiGLUBank":
        return ClampedSwiGLUBank(num_experts, dim, self.hidden(dim), self)

    def build_dense(self, dim: int):
        raise ValueError("ClampedSwiGLU: a dense (shared) FFN with the clamped gate is not implemented; use SwiGLU "
                         "or MLP for shared experts")


class ClampedSwiGLUBank(ExpertBank):
    spec: ClampedSwiGLU

    def _halves(self, w: Tensor) -> tuple[Tensor, Tensor]:
        if self.spec.interleaved:
            return w[:, 0::2], w[:, 1::2]
        return w[:, : self.hidden_dim], w[:, self.hidden_dim:]

    @property
    def gate_EFD(self) -> Tensor:
        return self._halves(self.w13_E2FD)[0]

    @property
    def up_EFD(self) -> Tensor:
        return self._halves(self.w13_E2FD)[1]

    @property
    def gate_bias_EF(self) -> Tensor | None:
        return None if self.b13_E2F is None else self._halves(self.b13_E2F)[0]

    @property
    def up_bias_EF(self) -> Tensor | None:
        return None if self.b13_E2F is None else self._halves(self.b13_E2F)[1]

    def glu(self, h_N2F: Tensor) -> Tensor:
        if (y := native_swiglu(h_N2F, self.spec.interleaved, (self.spec.alpha, self.spec.limit))) is not None:
            return y  # one pass each way (CPU float32 / bfloat16)
        if self.spec.interleaved:
            g, u = h_N2F[..., 0::2], h_N2F[..., 1::2]
        else:
            g, u = h_N2F.split(self.hidden_dim, dim=-1)
        return clamped_swiglu(g, u, self.spec.alpha, self.spec.limit)

    def native_gating(self) -> dict | None:
        return {"glu": True, "activation": "silu", "interleaved": self.spec.interleaved,
                "clamp": (self.spec.alpha, self.spec.limit)}

    def extra_repr(self) -> str:
        s = self.spec
        return f"{super().extra_repr()}, clamped alpha={s.alpha}, limit={s.limit}, interleaved={s.interleaved}"
