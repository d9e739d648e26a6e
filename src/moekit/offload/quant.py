"""Weight-only int8 / int4 quantisation of expert tensors with group-wise symmetric scales (plain torch ops).

Each run of ``group_size`` consecutive values along the last dimension shares one scale ``absmax / qmax``
(qmax = 127 for int8, 7 for int4), so every dequantised value is within ``scale / 2`` of the original: the bound
the tests check. int4 values are packed two per byte. torchao's int4/int8 weight-only layouts target CUDA/XPU
kernels; on CPU with our torch we keep to these few portable ops (and dequantise before the matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = {"int8": 127, "int4": 7}


@dataclass
class QuantizedTensor:
    data: torch.Tensor      # int8 [..., n] (int8) or uint8 [..., n/2] (int4, two values a byte)
    scale: torch.Tensor     # float32 [..., n / group_size]
    shape: tuple[int, ...]
    dtype: torch.dtype      # the original dtype, restored by dequantize()
    bits: str
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.bits == "int4":
            lo = (self.data & 0x0F).to(torch.int8) - 8
            hi = (self.data >> 4).to(torch.int8) - 8
            q = torch.stack([lo, hi], dim=-1).flatten(-2)
        else:
            q = self.data
        g = q.reshape(*q.shape[:-1], -1, self.group_size).float() * self.scale.float().unsqueeze(-1)
        return g.reshape(self.shape).to(dtype or self.dtype)


def quantize(w: torch.Tensor, bits: str = "int8", group_size: int = 64) -> QuantizedTensor:
    """Quantise ``w`` along its last dimension in groups of ``group_size`` (shrunk to a divisor of it if needed)."""
    if bits not in QMAX:
        raise ValueError(f"bits={bits!r}: expected one of {sorted(QMAX)}")
    if group_size <= 0:
        raise ValueError(f"group_size={group_size}: expected a positive integer")
    n = w.shape[-1]
    gs = min(group_size, n)
    while n % gs or (bits == "int4" and gs % 2):
        gs -= 1
        if gs == 0:
            raise ValueError(f"cannot group a last dimension of {n} for {bits}")
    qmax = QMAX[bits]
    g = w.detach().float().reshape(*w.shape[:-1], n // gs, gs)
    scale = (g.abs().amax(-1) / qmax).clamp_min(1e-30)
    q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8).reshape(w.shape)
    if bits == "int4":
        u = (q + 8).to(torch.uint8).reshape(*w.shape[:-1], n // 2, 2)
        data = u[..., 0] | (u[..., 1] << 4)
    else:
        data = q
    return QuantizedTensor(data.contiguous(), scale.contiguous(), tuple(w.shape), w.dtype, bits, gs)


def maybe_dequantize(t, dtype: torch.dtype) -> torch.Tensor:
    return t.dequantize(dtype) if isinstance(t, QuantizedTensor) else t.to(dtype)


def precision_by_importance(counts: dict[int, torch.Tensor], high: str | None = "int8", low: str = "int4",
                            high_fraction: float = 0.25) -> dict[tuple[int, int], str | None]:
    """EdgeMoE-style per-expert precision: in every layer the ``high_fraction`` most routed experts of a calibration
    profile (``counts[layer]`` = routed slots per expert) get ``high`` (None = uncompressed), the rest ``low``."""
    if not 0 <= high_fraction <= 1:
        raise ValueError(f"high_fraction={high_fraction}: expected a value in [0, 1]")
    for b in (high, low):
        if b is not None and b not in QMAX:
            raise ValueError(f"precision {b!r}: expected None or one of {sorted(QMAX)}")
    out = {}
    for layer, c in counts.items():
        n_high = round(len(c) * high_fraction)
        order = c.argsort(descending=True).tolist()
        for rank, e in enumerate(order):
            out[(layer, e)] = high if rank < n_high else low
    return out
