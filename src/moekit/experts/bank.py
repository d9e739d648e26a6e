"""Experts as stacked weight banks: ``w13_E2FD`` (GLU gate and up, fused; ``w1_EFD`` without GLU), ``w2_EDF`` (down).

One grouped computation runs every expert on its contiguous slice of the dispatched tokens. Fine-grained experts
(DeepSeekMoE) are a configuration: many experts with a small ``hidden_dim``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import native
from ..ops.grouped import IMPLS, auto_impl, grouped_linear
from ..spec import Spec, register_spec
from .activations import ACTIVATIONS
from .glu_fn import FUSED, fused_glu


@dataclasses.dataclass(frozen=True, kw_only=True)
class FFN(Spec):
    """A feed-forward expert: ``w2 @ (act(w1 @ x) * (w3 @ x))`` when ``glu`` else ``w2 @ act(w1 @ x)``.

    Args:
        hidden_dim: hidden units per expert (default 4 * dim).
        activation: a name from ``moekit.experts.ACTIVATIONS`` (silu, gelu, gelu_tanh, relu).
        glu: gated linear unit (SwiGLU / GeGLU) whose gate and up projections are fused in ``w13_E2FD``.
        bias: biases on every projection.
        impl: ``"auto"`` (on CPU float32 with two or more threads moekit's grouped BLAS call, ``"native"``; else
            grouped_mm where the dtype allows, else a split loop), ``"grouped_mm"``, ``"native"`` or ``"loop"``.
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


DECODE_MAX_ROWS = 16  # at most this many (token, expert) rows without autograd: the per-touched-expert decode path
SPLIT_MIN_BYTES = 1 << 20  # one-row matmuls split their weight over the threads from this size (below: one mm)


def _row_chunks(rows: int, nbytes: int) -> int:
    """How many row blocks :func:`small_linear` splits a weight into for one input row: twice the intra-op threads
    (measured best on 2 cores; docs/performance.md), reduced until it divides ``rows``; 1 with one thread or a
    weight under ``SPLIT_MIN_BYTES`` (a parallel region costs more than the split saves on a cache-sized weight)."""
    threads = torch.get_num_threads()
    c = 2 * threads if threads > 1 and nbytes >= SPLIT_MIN_BYTES else 1
    while c > 1 and rows % c:
        c -= 1
    return c


def small_linear(x_MD: Tensor, w_OD: Tensor, b_O: Tensor | None = None) -> Tensor:
    """``x_MD @ w_OD.T (+ b_O)`` for a handful of rows (decode), reading the weight once at close to memory
    bandwidth on CPU, where MKL's skinny GEMM/GEMV runs on one core:

    - one row: a weight of at least ``SPLIT_MIN_BYTES`` split into blocks, one batched matmul (``bmm`` spreads the
      blocks over the threads): row blocks of an (out, in) weight, or reduction blocks of an (in, out) one (a
      transposed view) whose partial rows are then added; a smaller weight in a single ``mm`` / ``addmm``;
    - 2-16 rows: the weight as the left operand, ``w_OD @ x_MD.T`` with the rows of ``x`` contiguous (BLAS streams
      the big operand ~2x better that way than ``x @ w.T``).

    float32 or bfloat16 without autograd takes moekit's native kernel instead where it is built
    (:mod:`moekit.ops.native`), which reads the weight at 1.1-2x the speed of the BLAS forms above (both layouts)."""
    M, D = x_MD.shape
    O = w_OD.shape[0]
    if x_MD.dtype in native.DTYPES and M <= native.MAX_ROWS and native.takes_rows(x_MD):
        w_1OD, b_1O = w_OD.unsqueeze(0), None if b_O is None else b_O.unsqueeze(0)
        if native.takes_weight(w_1OD, b_1O, x_MD.dtype):
            return native.grouped_rows(x_MD, w_1OD, b_1O, _ZERO, [0, M], list(range(M)))
    if M == 1:
        y_MO = _one_row_split(x_MD, w_OD)
        if y_MO is None:
            return torch.mm(x_MD, w_OD.T) if b_O is None else torch.addmm(b_O, x_MD, w_OD.T)
        return y_MO if b_O is None else y_MO + b_O
    xT_DM = x_MD.contiguous().T  # a transposed view of contiguous rows
    yT_OM = torch.mm(w_OD, xT_DM) if b_O is None else torch.addmm(b_O.unsqueeze(1), w_OD, xT_DM)
    return yT_OM.T


_ZERO = [0]


def _one_row_split(x_1D: Tensor, w_OD: Tensor) -> Tensor | None:
    """``x_1D @ w_OD.T`` as one ``bmm`` over blocks of the weight (spread over the threads), or None where no split
    applies (one thread, a weight under ``SPLIT_MIN_BYTES``, no block count dividing it, or another layout). An
    (out, in) weight splits into row blocks; an (in, out) one (a transposed view, e.g. a swap sharing HF's
    ``gate_up_proj``) into contiguous reduction blocks whose partial rows are added."""
    O, D = w_OD.shape
    nbytes = O * D * w_OD.element_size()
    if w_OD.is_contiguous() and (c := _row_chunks(O, nbytes)) > 1:
        return torch.bmm(x_1D.expand(c, 1, D), w_OD.view(c, O // c, D).transpose(1, 2)).view(1, O)
    if w_OD.stride() == (1, O) and (c := _row_chunks(D, nbytes)) > 1:
        return torch.bmm(x_1D.reshape(c, 1, D // c), w_OD.T.view(c, D // c, O)).sum(0)
    return None


def _init_bank(w: Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(w, -bound, bound)


class ExpertBank(nn.Module):
    """``forward(x_ND, counts_E) -> y_ND`` with rows grouped by expert in order 0..E-1.

    Parameters (E experts, D dim, F hidden):

    - GLU experts: ``w13_E2FD`` (E, 2F, D), rows ``[:F]`` the gate (``act`` input) and rows ``[F:]`` the up
      projection, the layout Hugging Face stores as ``gate_up_proj`` (so a swap can share that Parameter); one
      grouped matmul computes gate and up. Biases: ``b13_E2F`` (E, 2F), same split.
    - non-GLU (MLP) experts: ``w1_EFD`` (E, F, D), bias ``b1_EF``.
    - both: ``w2_EDF`` (E, D, F), bias ``b2_ED``.

    ``gate_EFD`` / ``up_EFD`` / ``gate_bias_EF`` / ``up_bias_EF`` are views of the input projections for readers
    that want them apart (``up_*`` is None without GLU). State dicts of the older two-weight layout
    (``w1_EFD`` + ``w3_EFD``, ``b1_EF`` + ``b3_EF``) are converted on load.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, spec: FFN) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.act = ACTIVATIONS.get(spec.activation)
        E, D, Fh = num_experts, dim, hidden_dim
        if spec.glu:
            self.w13_E2FD = nn.Parameter(torch.empty(E, 2 * Fh, D))
            self.b13_E2F = nn.Parameter(torch.zeros(E, 2 * Fh)) if spec.bias else None
        else:
            self.w1_EFD = nn.Parameter(torch.empty(E, Fh, D))
            self.b1_EF = nn.Parameter(torch.zeros(E, Fh)) if spec.bias else None
        self.w2_EDF = nn.Parameter(torch.empty(E, D, Fh))
        self.b2_ED = nn.Parameter(torch.zeros(E, D)) if spec.bias else None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------- layout
    @property
    def w_in(self) -> Tensor:
        """The input projection parameter: ``w13_E2FD`` (GLU) or ``w1_EFD``."""
        return self.w13_E2FD if self.spec.glu else self.w1_EFD

    @property
    def b_in(self) -> Tensor | None:
        """The input projection bias: ``b13_E2F`` (GLU) or ``b1_EF`` (None without biases)."""
        return self.b13_E2F if self.spec.glu else self.b1_EF

    @property
    def gate_EFD(self) -> Tensor:
        """(E, F, D) view: the activation's input projection (the GLU gate, or the MLP's only input weight)."""
        return self.w13_E2FD[:, : self.hidden_dim] if self.spec.glu else self.w1_EFD

    @property
    def up_EFD(self) -> Tensor | None:
        """(E, F, D) view of the GLU up projection; None without GLU."""
        return self.w13_E2FD[:, self.hidden_dim :] if self.spec.glu else None

    @property
    def gate_bias_EF(self) -> Tensor | None:
        b = self.b_in
        return None if b is None else b[:, : self.hidden_dim]

    @property
    def up_bias_EF(self) -> Tensor | None:
        b = self.b13_E2F if self.spec.glu else None
        return None if b is None else b[:, self.hidden_dim :]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The two-weight GLU layout (moekit <= 0.x: w1_EFD gate, w3_EFD up) loads into the fused w13_E2FD.
        if self.spec.glu:
            for old1, old3, new in (("w1_EFD", "w3_EFD", "w13_E2FD"), ("b1_EF", "b3_EF", "b13_E2F")):
                k1, k3 = prefix + old1, prefix + old3
                if k1 in state_dict and k3 in state_dict and prefix + new not in state_dict:
                    state_dict[prefix + new] = torch.cat([state_dict.pop(k1), state_dict.pop(k3)], dim=1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def reset_parameters(self) -> None:
        # Gate and up are drawn one after the other, as two (E, F, D) weights were.
        _init_bank(self.gate_EFD, self.dim)
        if self.up_EFD is not None:
            _init_bank(self.up_EFD, self.dim)
        _init_bank(self.w2_EDF, self.hidden_dim)
        for b in (self.b_in, self.b2_ED):
            if b is not None:
                nn.init.zeros_(b)

    # ------------------------------------------------------------------------------------------- compute
    def decodes(self, x_ND: Tensor) -> bool:
        """Whether ``forward`` takes the per-touched-expert decode path for these rows (no autograd, CPU, at most
        ``DECODE_MAX_ROWS`` rows, ``impl="auto"``)."""
        # (the shape test last: under compile / export it would add a guard on the token count)
        return (not torch.compiler.is_compiling() and not torch.is_grad_enabled() and self.spec.impl == "auto"
                and x_ND.device.type == "cpu" and 0 < x_ND.shape[0] <= DECODE_MAX_ROWS)

    def forward(self, x_ND: Tensor, counts_E: Tensor, expert_N: Tensor | None = None) -> Tensor:
        if expert_N is not None and self.decodes(x_ND):
            return self._decode(x_ND, expert_N)
        impl = self.spec.impl
        offsets_E = counts_list = None
        if not (torch.compiler.is_compiling() or x_ND.device.type == "meta"):  # else: grouped_linear's custom op
            if impl == "auto":  # decide once per call: every projection then takes the same path
                impl = auto_impl(x_ND, self.w_in, self.w2_EDF)
            offsets_E = torch.cumsum(counts_E, 0, dtype=torch.int32) if impl == "grouped_mm" else None
            counts_list = counts_E.tolist() if impl in ("loop", "native") else None
        b_in = self.b_in
        if b_in is not None and expert_N is None:
            expert_N = torch.repeat_interleave(torch.arange(self.num_experts, device=x_ND.device), counts_E)

        def proj(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            y = grouped_linear(x, w, counts_E, offsets_E, counts_list, impl)
            return y if b is None else y + b.index_select(0, expert_N)  # (backward: index_add, not index_put)

        h = proj(x_ND, self.w_in, b_in)
        h_NF = self.glu(h) if self.spec.glu else self.act(h)
        return proj(h_NF, self.w2_EDF, self.b2_ED)

    def glu(self, h_N2F: Tensor) -> Tensor:
        """The GLU of the fused input projection ``(rows, 2F) -> (rows, F)``: ``act(gate) * up``. A bank subclass
        with another gating (``moekit.experts.clamped.ClampedSwiGLU``) overrides this one method."""
        if ((h_N2F.requires_grad or h_N2F.shape[0] > DECODE_MAX_ROWS) and self.spec.activation in FUSED
                and not torch.compiler.is_compiling()):
            # training: one buffer for the gradient of both halves; and beyond decode sizes without autograd, the
            # same one-pass native SwiGLU as training's forward (torch's act + mul are two passes over the rows)
            return fused_glu(h_N2F, self.spec.activation)
        F = self.hidden_dim  # slicing, not Tensor.split: split's Python wrapper costs more than the op at decode
        return self.act(h_N2F[..., :F]) * h_N2F[..., F:]

    def _decode(self, x_ND: Tensor, expert_N: Tensor) -> Tensor:
        """Few rows, no autograd (serving): per *touched* expert, two small matmuls (:func:`small_linear`) that read
        the expert's weights once, in their stored (out, in) layout; untouched experts are not read and there is no
        grouped-kernel setup. The row-to-expert map is read on the host (a CPU tensor: no device synchronisation).
        Rows need not be sorted: when each expert's rows are one run (sorted rows, or a single token's pairs), the
        gating runs once over all rows and the outputs are concatenated (fewest ops per call); otherwise each expert
        gathers and scatters its rows."""
        ids = expert_N.tolist()
        if x_ND.dtype in native.DTYPES and native.takes_rows(x_ND):
            y = self._decode_native(x_ND, ids)
            if y is not None:
                return y
        runs: list[list[int]] = []  # [expert, first row, end row] per run of equal experts
        for n, e in enumerate(ids):
            if runs and runs[-1][0] == e:
                runs[-1][2] = n + 1
            else:
                runs.append([e, n, n + 1])
        if len({r[0] for r in runs}) < len(runs):
            return self._decode_scattered(x_ND, runs)
        w_in, w2, b_in, b2 = self.w_in, self.w2_EDF, self.b_in, self.b2_ED
        h = [small_linear(x_ND[a:b], w_in[e], None if b_in is None else b_in[e]) for e, a, b in runs]
        h_N2F = h[0] if len(h) == 1 else torch.cat(h)
        h_NF = self.glu(h_N2F) if self.spec.glu else self.act(h_N2F)  # the bank's own gating (ClampedSwiGLU...)
        y = [small_linear(h_NF[a:b], w2[e], None if b2 is None else b2[e]) for e, a, b in runs]
        return y[0] if len(y) == 1 else torch.cat(y)

    def _decode_native(self, x_ND: Tensor, ids: list[int]) -> Tensor | None:
        """The decode path on :mod:`moekit.ops.native`, rows in any order: the whole FFN of every touched expert in
        one kernel call where the bank's gating has a native form (the plain ``glu``, an activation of
        ``native.ACTIVATIONS``, (out, in) weights); else one call for the input projections, the bank's own gating
        over all rows, one call for the output projections. None where the kernel does not take these weights
        (then the torch path runs)."""
        groups: dict[int, list[int]] = {}
        for n, e in enumerate(ids):
            groups.setdefault(e, []).append(n)
        dtype = x_ND.dtype
        if not (native.takes_weight(self.w_in, self.b_in, dtype) and native.takes_weight(self.w2_EDF, self.b2_ED, dtype)):
            return None
        experts = list(groups)
        offsets = [0]
        rows: list[int] = []
        for e in experts:
            rows += groups[e]
            offsets.append(len(rows))
        gating = self.native_gating()
        if gating is not None:
            return native.ffn(x_ND, self.w_in, self.b_in, self.w2_EDF, self.b2_ED, experts=experts, offsets=offsets,
                              rows=rows, **gating)
        h_N2F = native.grouped_rows(x_ND, self.w_in, self.b_in, experts, offsets, rows)
        h_NF = self.glu(h_N2F) if self.spec.glu else self.act(h_N2F)
        if not native.takes_rows(h_NF):  # a gating that returns a strided view
            h_NF = h_NF.contiguous()
        return native.grouped_rows(h_NF, self.w2_EDF, self.b2_ED, experts, offsets, rows)

    def native_gating(self) -> dict[str, Any] | None:
        """This bank's gating as the native FFN kernel's keyword arguments (``glu``, ``activation``, and where a
        subclass has them ``interleaved``, ``clamp``; see :func:`moekit.ops.native.ffn`), or None where the kernel
        has no form of it (then the bank's own :meth:`glu` runs between two grouped projections)."""
        if type(self).glu is not ExpertBank.glu or self.spec.activation not in native.ACTIVATIONS:
            return None
        return {"glu": self.spec.glu, "activation": self.spec.activation}

    def _decode_scattered(self, x_ND: Tensor, runs: list[list[int]]) -> Tensor:
        rows: dict[int, list[int]] = {}
        for e, a, b in runs:
            rows.setdefault(e, []).extend(range(a, b))
        out_ND = x_ND.new_empty(x_ND.shape[0], self.dim)
        w_in, w2, b_in, b2 = self.w_in, self.w2_EDF, self.b_in, self.b2_ED
        for e, idx in rows.items():
            sel = torch.tensor(idx, device=x_ND.device)
            h = small_linear(x_ND[sel], w_in[e], None if b_in is None else b_in[e])
            h_MF = self.glu(h) if self.spec.glu else self.act(h)
            out_ND[sel] = small_linear(h_MF, w2[e], None if b2 is None else b2[e])
        return out_ND

    def expert_forward(self, e: int, x_TD: Tensor) -> Tensor:
        """Run expert ``e`` alone on ``x_TD`` (reference and inspection; not the fast path)."""
        b_in = self.b_in
        h = x_TD @ self.w_in[e].T + (0 if b_in is None else b_in[e])
        h = self.glu(h) if self.spec.glu else self.act(h)
        return h @ self.w2_EDF[e].T + (0 if self.b2_ED is None else self.b2_ED[e])

    def extra_repr(self) -> str:
        s = self.spec
        return f"E={self.num_experts}, D={self.dim}, F={self.hidden_dim}, act={s.activation}, glu={s.glu}, bias={s.bias}"


class DenseFFN(nn.Module):
    """One dense FFN with the same parametrisation as one expert (shared experts, the benchmark floor).

    Gate and up stay two weights (``w1_FD``, ``w3_FD``) here: Hugging Face keeps a shared expert as separate
    ``gate_proj`` / ``up_proj`` Linears, which a swap with ``share=True`` uses without a copy.
    """

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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_bank(self.w1_FD, self.dim)
        if self.w3_FD is not None:
            _init_bank(self.w3_FD, self.dim)
        _init_bank(self.w2_DF, self.hidden_dim)
        for b in (self.b1_F, self.b3_F, self.b2_D):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: Tensor) -> Tensor:
        F_ = torch.nn.functional
        h = self.act(F_.linear(x, self.w1_FD, self.b1_F))
        if self.w3_FD is not None:
            h = h * F_.linear(x, self.w3_FD, self.b3_F)
        return F_.linear(h, self.w2_DF, self.b2_D)

    def extra_repr(self) -> str:
        return f"D={self.dim}, F={self.hidden_dim}, act={self.spec.activation}, glu={self.spec.glu}"
