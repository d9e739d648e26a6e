"""Union of Experts (Yang et al. 2025), attention side: heads as experts, and selective multi-head attention.

Decomposition (exact): with per-head column slices of W_q, W_k, W_v and row slices of W_O,

    MHA(X) = sum_h softmax(Q_h K_h^T / sqrt(d_h) [+ causal mask]) V_h W_O,h^T + b_O.

Selective multi-head attention (SMHA, the authors' LM code): a gate ``g = softmax(x W_g + b_g)`` over the H heads
keeps each token's top ``head_k`` heads. Head h then works only on the tokens that selected it: Q/K/V are computed
for those tokens only, they attend among themselves (causally by original position when ``causal``), and the head's
output projection is scatter-added back to their positions. Tokens that did not select h neither query nor serve
as keys for h. ``weighted=True`` multiplies a head's output at a token by that token's gate value (not in the
authors' code, where the gate only ranks); by default the gate gets no gradient, as released.

Differences from the released code, on purpose: no RoPE (this module has no positional encoding; add your own
before it), and no padding tokens: the authors pad every head to the largest routed count with the next-best
tokens, which then also act as keys; here each head's set is exactly the tokens that chose it.
With ``head_k = num_heads`` the layer equals the dense multi-head attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class HeadExperts(nn.Module):
    """Multi-head attention held as H head experts: ``wq_HKD``, ``wk_HKD``, ``wv_HKD`` (H, d_h, D), ``bq_HK``...,
    ``wo_HDK`` (H, D, d_h) and one ``bo_D``.

    Args:
        dim: D.  num_heads: H (divides D).  bias: biases on the projections.  causal: causal attention.
        head_k: heads kept per token (None: all heads, the dense computation).  weighted: see module docs.

    ``forward(x_BLD) -> (B, L, D)``. After a selective call ``last_keep_BLH`` holds the kept heads per token.
    """

    def __init__(self, dim: int, num_heads: int, *, bias: bool = True, causal: bool = False,
                 head_k: int | None = None, weighted: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"HeadExperts: num_heads={num_heads} must divide dim={dim}")
        if head_k is not None and not 1 <= head_k <= num_heads:
            raise ValueError(f"HeadExperts: head_k must be in [1, {num_heads}], got {head_k}")
        H, K = num_heads, dim // num_heads
        self.dim, self.num_heads, self.head_dim = dim, H, K
        self.causal, self.head_k, self.weighted = causal, head_k, weighted
        bound = 1 / math.sqrt(dim)
        for name in ("wq_HKD", "wk_HKD", "wv_HKD"):
            setattr(self, name, nn.Parameter(torch.empty(H, K, dim).uniform_(-bound, bound)))
        self.wo_HDK = nn.Parameter(torch.empty(H, dim, K).uniform_(-bound, bound))
        for name in ("bq_HK", "bk_HK", "bv_HK"):
            setattr(self, name, nn.Parameter(torch.zeros(H, K)) if bias else None)
        self.bo_D = nn.Parameter(torch.zeros(dim)) if bias else None
        self.gate = nn.Linear(dim, H) if head_k is not None else None
        self.last_keep_BLH: Tensor | None = None

    # ------------------------------------------------------------------------------------------ decomposition
    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, causal: bool = False, head_k: int | None = None,
                   weighted: bool = False) -> HeadExperts:
        """Exact head experts of a ``torch.nn.MultiheadAttention`` (``batch_first=True``, no bias_kv/zero_attn,
        equal q/k/v dims). Dropout is not carried over."""
        if not mha.batch_first or mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise ValueError("HeadExperts.from_torch: needs batch_first=True, no add_bias_kv/add_zero_attn, kdim=vdim=D")
        bias = mha.in_proj_bias is not None
        out = cls(mha.embed_dim, mha.num_heads, bias=bias, causal=causal, head_k=head_k, weighted=weighted)
        out = out.to(mha.in_proj_weight.dtype)
        H, K, D = out.num_heads, out.head_dim, out.dim
        with torch.no_grad():
            wq, wk, wv = mha.in_proj_weight.chunk(3, dim=0)
            for mine, w in ((out.wq_HKD, wq), (out.wk_HKD, wk), (out.wv_HKD, wv)):
                mine.copy_(w.reshape(H, K, D))
            out.wo_HDK.copy_(mha.out_proj.weight.reshape(D, H, K).permute(1, 0, 2))
            if bias:
                bq, bk, bv = mha.in_proj_bias.chunk(3)
                for mine, b in ((out.bq_HK, bq), (out.bk_HK, bk), (out.bv_HK, bv)):
                    mine.copy_(b.reshape(H, K))
                out.bo_D.copy_(mha.out_proj.bias)
        return out

    # ------------------------------------------------------------------------------------------ compute
    def _proj(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """x (B, H, C, D) with per-head weights (H, d_h, D) -> (B, H, C, d_h)."""
        y = torch.einsum("bhcd,hkd->bhck", x, w)
        return y if b is None else y + b[:, None, :]

    def _attend(self, x_BHCD: Tensor, pos_BHC: Tensor, valid_BHC: Tensor) -> Tensor:
        """Each head attends among its own gathered tokens; returns the head outputs projected to D: (B, H, C, D)."""
        q = self._proj(x_BHCD, self.wq_HKD, self.bq_HK)
        k = self._proj(x_BHCD, self.wk_HKD, self.bk_HK)
        v = self._proj(x_BHCD, self.wv_HKD, self.bv_HK)
        s = torch.einsum("bhqk,bhsk->bhqs", q, k) / math.sqrt(self.head_dim)
        allowed = valid_BHC[:, :, None, :] & valid_BHC[:, :, :, None]
        if self.causal:
            allowed = allowed & (pos_BHC[:, :, None, :] <= pos_BHC[:, :, :, None])
        # a padded query row would be all -inf; let it see itself and zero its output afterwards
        eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
        allowed = allowed | (eye & ~valid_BHC[:, :, :, None])
        a = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = torch.einsum("bhqs,bhsk->bhqk", a, v)
        return torch.einsum("bhqk,hdk->bhqd", o, self.wo_HDK) * valid_BHC[..., None]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"HeadExperts: expected (batch, seq, {self.dim}), got {tuple(x.shape)}")
        B, L, D = x.shape
        H = self.num_heads
        if self.head_k is None:
            pos_BHL = torch.arange(L, device=x.device).expand(B, H, L)
            y_BHLD = self._attend(x[:, None].expand(B, H, L, D), pos_BHL, torch.ones(B, H, L, dtype=torch.bool, device=x.device))
            y = y_BHLD.sum(1)
            return y if self.bo_D is None else y + self.bo_D

        gate_BLH = self.gate(x).softmax(-1)
        keep_BLH = torch.zeros_like(gate_BLH, dtype=torch.bool).scatter_(-1, gate_BLH.topk(self.head_k, -1).indices, True)
        self.last_keep_BLH = keep_BLH
        keep_BHL = keep_BLH.transpose(1, 2)
        count_BH = keep_BHL.sum(-1)
        C = int(count_BH.max())
        # the selected positions of each (sequence, head) in ascending order, padded to C
        pos_L = torch.arange(L, device=x.device)
        order_BHL = torch.where(keep_BHL, pos_L, pos_L + L).argsort(-1)
        pos_BHC = order_BHL[..., :C]
        valid_BHC = torch.arange(C, device=x.device) < count_BH[..., None]
        x_BHCD = x.gather(1, pos_BHC.reshape(B, H * C, 1).expand(B, H * C, D)).reshape(B, H, C, D)
        y_BHCD = self._attend(x_BHCD, pos_BHC, valid_BHC)
        if self.weighted:
            y_BHCD = y_BHCD * gate_BLH.transpose(1, 2).gather(2, pos_BHC).unsqueeze(-1)
        y = x.new_zeros(B, L, D).scatter_add(1, pos_BHC.reshape(B, H * C, 1).expand(B, H * C, D), y_BHCD.reshape(B, H * C, D))
        return y if self.bo_D is None else y + self.bo_D

    def extra_repr(self) -> str:
        return f"D={self.dim}, heads={self.num_heads}, head_k={self.head_k}, causal={self.causal}"
