"""Union of Experts (Yang et al. 2025), MLP side: a dense MLP cut into E expert slices, with token selection.

Decomposition (exact, the tensor-parallel partition): split W1 (and W3 for GLU) by hidden units into E blocks and W2
by the same hidden units. Then ``MLP(x) = sum_e slice_e(x) + b2`` with ``slice_e(x) = act(x W1_e^T + b1_e) W2_e^T``.

Token ("data") selection, UoME-DS in the authors' language-model code: a gate ``g = softmax(x W_g + b_g)`` over the
E slices, masked to each token's top-k slices, ranks the tokens; **each slice processes the top ``capacity * L``
tokens of every sequence** by its masked score and adds its output at their positions. As read in the released code
the gate values are only used for ranking (``weighted=False``, the default), so the gate gets no gradient;
``weighted=True`` multiplies each slice's output by the token's gate value instead (a common MoE choice, not the
authors'). With k = E and capacity 1 every slice sees every token and the layer equals the dense MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..experts.activations import ACTIVATIONS


@dataclass(frozen=True, kw_only=True)
class TokenSelection:
    """UoME-DS routing: ``k`` slices kept per token by the gate, each slice takes ``capacity`` of each sequence."""

    k: int = 2
    capacity: float = 0.5
    weighted: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"TokenSelection: k must be >= 1, got {self.k}")
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"TokenSelection: capacity must be in (0, 1], got {self.capacity}")

    def tokens_per_slice(self, seq_len: int) -> int:
        return max(1, min(seq_len, math.floor(self.capacity * seq_len + 1e-9)))


class SlicedMLP(nn.Module):
    """A dense MLP held as E hidden-unit slices (``w1_EFD``, ``w3_EFD``, ``w2_EDF``, ``b1_EF``, ``b3_EF``, one ``b2_D``).

    Args:
        dim: D.  hidden_dim: total hidden units F (divisible by num_slices).  num_slices: E.
        activation, glu, bias: as :class:`moekit.MLP` / :class:`moekit.SwiGLU`.
        selection: a :class:`TokenSelection` to route tokens to slices, or None for the dense computation.

    ``forward(x)`` takes ``(B, L, D)`` (selection is per sequence) or, without selection, any ``(..., D)``.
    After a routed call ``last_selected_BEC`` holds the positions each slice processed.
    """

    def __init__(
        self, dim: int, hidden_dim: int, num_slices: int, *, activation: str = "gelu", glu: bool = False,
        bias: bool = True, selection: TokenSelection | None = None,
    ) -> None:
        super().__init__()
        if num_slices < 1 or hidden_dim % num_slices:
            raise ValueError(f"SlicedMLP: hidden_dim={hidden_dim} must be a positive multiple of num_slices={num_slices}")
        if selection is not None and selection.k > num_slices:
            raise ValueError(f"SlicedMLP: selection.k={selection.k} is larger than num_slices={num_slices}")
        E, Fe = num_slices, hidden_dim // num_slices
        self.dim, self.hidden_dim, self.num_slices, self.slice_dim = dim, hidden_dim, E, Fe
        self.activation = activation
        self.act = ACTIVATIONS.get(activation)
        bound1, bound2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden_dim)
        self.w1_EFD = nn.Parameter(torch.empty(E, Fe, dim).uniform_(-bound1, bound1))
        self.w3_EFD = nn.Parameter(torch.empty(E, Fe, dim).uniform_(-bound1, bound1)) if glu else None
        self.w2_EDF = nn.Parameter(torch.empty(E, dim, Fe).uniform_(-bound2, bound2))
        self.b1_EF = nn.Parameter(torch.zeros(E, Fe)) if bias else None
        self.b3_EF = nn.Parameter(torch.zeros(E, Fe)) if bias and glu else None
        self.b2_D = nn.Parameter(torch.zeros(dim)) if bias else None
        self.selection = selection
        self.gate = nn.Linear(dim, E) if selection is not None else None
        self.last_selected_BEC: Tensor | None = None

    # ------------------------------------------------------------------------------------------ decomposition
    @classmethod
    def from_dense(cls, dense: nn.Module, num_slices: int, *, selection: TokenSelection | None = None) -> SlicedMLP:
        """Exact slices of a :class:`moekit.experts.DenseFFN` (or anything with ``w1_FD``, ``w2_DF``, ...)."""
        spec = dense.spec
        out = cls(dense.dim, dense.hidden_dim, num_slices, activation=spec.activation, glu=spec.glu, bias=spec.bias,
                  selection=selection).to(dense.w1_FD.dtype)
        return out.load_dense_(w1_FD=dense.w1_FD, w2_DF=dense.w2_DF, w3_FD=dense.w3_FD, b1_F=dense.b1_F,
                               b3_F=dense.b3_F, b2_D=dense.b2_D)

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, num_slices: int, *, activation: str = "gelu",
                     selection: TokenSelection | None = None) -> SlicedMLP:
        """Exact slices of ``fc2(act(fc1(x)))`` built from two ``nn.Linear`` (both with or both without bias)."""
        bias = fc1.bias is not None
        if (fc2.bias is not None) != bias:
            raise ValueError("SlicedMLP.from_linears: fc1 and fc2 must both have a bias or both not")
        if fc1.out_features != fc2.in_features or fc1.in_features != fc2.out_features:
            raise ValueError(f"SlicedMLP.from_linears: shapes do not chain: {fc1} then {fc2}")
        out = cls(fc1.in_features, fc1.out_features, num_slices, activation=activation, bias=bias,
                  selection=selection).to(fc1.weight.dtype)
        return out.load_dense_(w1_FD=fc1.weight, w2_DF=fc2.weight, b1_F=fc1.bias, b2_D=fc2.bias)

    @torch.no_grad()
    def load_dense_(self, *, w1_FD: Tensor, w2_DF: Tensor, w3_FD: Tensor | None = None, b1_F: Tensor | None = None,
                    b3_F: Tensor | None = None, b2_D: Tensor | None = None) -> SlicedMLP:
        E, Fe, D = self.num_slices, self.slice_dim, self.dim
        self.w1_EFD.copy_(w1_FD.reshape(E, Fe, D))
        self.w2_EDF.copy_(w2_DF.reshape(D, E, Fe).permute(1, 0, 2))
        for mine, theirs in ((self.w3_EFD, w3_FD), (self.b1_EF, b1_F), (self.b3_EF, b3_F)):
            if (mine is None) != (theirs is None):
                raise ValueError("SlicedMLP.load_dense_: the dense MLP and the slices disagree on glu/bias")
            if mine is not None:
                mine.copy_(theirs.reshape(mine.shape))
        if (self.b2_D is None) != (b2_D is None):
            raise ValueError("SlicedMLP.load_dense_: the dense MLP and the slices disagree on bias")
        if b2_D is not None:
            self.b2_D.copy_(b2_D)
        return self

    def dense_weights(self) -> dict[str, Tensor | None]:
        """The dense parametrisation (``w1_FD``, ``w2_DF``, ...) as views of the slices; gradients flow."""
        E, Fe, D = self.num_slices, self.slice_dim, self.dim
        flat = lambda t: None if t is None else t.reshape(E * Fe, *t.shape[2:])
        return {"w1_FD": flat(self.w1_EFD), "w3_FD": flat(self.w3_EFD),
                "w2_DF": self.w2_EDF.permute(1, 0, 2).reshape(D, E * Fe),
                "b1_F": None if self.b1_EF is None else self.b1_EF.reshape(-1),
                "b3_F": None if self.b3_EF is None else self.b3_EF.reshape(-1), "b2_D": self.b2_D}

    # ------------------------------------------------------------------------------------------ compute
    def slices_forward(self, x_BECD: Tensor) -> Tensor:
        """Slice e applied to ``x[:, e]`` for every e, without the output bias: (B, E, C, D) -> (B, E, C, D)."""
        h = torch.einsum("becd,efd->becf", x_BECD, self.w1_EFD)
        if self.b1_EF is not None:
            h = h + self.b1_EF[:, None, :]
        h = self.act(h)
        if self.w3_EFD is not None:
            g = torch.einsum("becd,efd->becf", x_BECD, self.w3_EFD)
            h = h * (g if self.b3_EF is None else g + self.b3_EF[:, None, :])
        return torch.einsum("becf,edf->becd", h, self.w2_EDF)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"SlicedMLP: expected (..., {self.dim}), got {tuple(x.shape)}")
        if self.selection is None:
            x_BED = x.reshape(-1, 1, 1, self.dim).expand(-1, self.num_slices, 1, self.dim)
            y = self.slices_forward(x_BED).sum(1).reshape(x.shape)
            return y if self.b2_D is None else y + self.b2_D
        if x.dim() != 3:
            raise ValueError(f"SlicedMLP with token selection needs (batch, seq, {self.dim}), got {tuple(x.shape)}")
        sel = self.selection
        B, L, D = x.shape
        E, C = self.num_slices, sel.tokens_per_slice(L)

        gate_BLE = self.gate(x).softmax(-1)
        keep_BLE = torch.zeros_like(gate_BLE, dtype=torch.bool).scatter_(-1, gate_BLE.topk(sel.k, dim=-1).indices, True)
        score_BLE = gate_BLE * keep_BLE
        pos_BEC = score_BLE.detach().transpose(1, 2).topk(C, dim=-1).indices  # each slice's top-C tokens per sequence
        self.last_selected_BEC = pos_BEC

        x_BECD = x.gather(1, pos_BEC.reshape(B, E * C, 1).expand(B, E * C, D)).reshape(B, E, C, D)
        y_BECD = self.slices_forward(x_BECD)
        if sel.weighted:
            y_BECD = y_BECD * score_BLE.transpose(1, 2).gather(2, pos_BEC).unsqueeze(-1)
        y_BLD = x.new_zeros(B, L, D).scatter_add(1, pos_BEC.reshape(B, E * C, 1).expand(B, E * C, D),
                                                  y_BECD.reshape(B, E * C, D))
        return y_BLD if self.b2_D is None else y_BLD + self.b2_D

    def active_fraction(self, seq_len: int) -> float:
        """Fraction of the dense MLP's FLOPs a routed call spends (slice-token pairs over E * L)."""
        return 1.0 if self.selection is None else self.selection.tokens_per_slice(seq_len) / seq_len

    def extra_repr(self) -> str:
        return f"D={self.dim}, F={self.hidden_dim}, slices={self.num_slices}, selection={self.selection}"
