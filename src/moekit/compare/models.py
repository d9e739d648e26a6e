"""The two small models ``moekit compare`` trains: a byte-level decoder LM whose FFNs are MoE layers, and a
digits classifier with per-example adapters (SMEAR and its baselines) on a frozen random embedding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts.bank import MLP
from ..layer import MoE
from ..merging import SMEAR
from ..routers.base import RouterSpec


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BLD: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ffn = ffn
        # what the router declares it reads (MoE++ gating residuals, hash routing's token ids)
        self.wants_prev_logits = isinstance(ffn, MoE) and ffn.router_spec is not None and ffn.needs_prev_logits
        self.wants_token_ids = isinstance(ffn, MoE) and ffn.needs_token_ids

    def forward(self, x_BLD: Tensor, prev_logits: Tensor | None, ids_BL: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        x_BLD = x_BLD + self.attn(self.ln1(x_BLD))
        h = self.ln2(x_BLD)
        if isinstance(self.ffn, MoE):
            out = self.ffn.forward_with_aux(h, prev_logits=prev_logits if self.wants_prev_logits else None,
                                            token_ids=ids_BL if self.wants_token_ids else None)
            return x_BLD + out.y, out.assignment.logits_TE, out.aux_loss
        return x_BLD + self.ffn(h), None, h.new_zeros(())


class TinyLM(nn.Module):
    """Pre-LN decoder: byte embedding + learned positions, ``layers`` blocks of attention and an FFN each.

    ``ffn_factory(layer_index) -> nn.Module`` builds each FFN (an :class:`moekit.MoE` or a dense FFN). MoE layers'
    routing logits are passed to the next MoE layer whose router asks for them (MoE++ gating residuals).
    """

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int, ffn_factory: Callable[[int], nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, ffn_factory(i)) for i in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx_BL: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed(idx_BL) + self.pos[: idx_BL.shape[1]]
        prev, aux = None, x.new_zeros(())
        for block in self.blocks:
            x, logits, a = block(x, prev, idx_BL)
            prev = logits if logits is not None else prev
            aux = aux + a
        return self.head(self.ln_f(x)), aux


def moe_factory(dim: int, num_experts: int, hidden: int, router: Any, balance: tuple, experts: Any = None,
                dispatch: Any = None) -> Callable[[int], nn.Module]:
    """FFN factory for :class:`TinyLM`: the same MoE spec at every layer; a router spec with a ``gating_residual``
    field gets it turned on from the second layer (MoE++)."""

    def make(i: int) -> nn.Module:
        r = router.at_layer(i) if isinstance(router, RouterSpec) else router
        return MoE(dim, num_experts, router=r, experts=experts or MLP(hidden_dim=hidden, activation="gelu"),
                   balance=balance, dispatch=dispatch)

    return make


class AdapterNet(nn.Module):
    """Digits classifier: a frozen random embedding ``gelu(x W)``, ``layers`` residual adapter blocks
    ``h + A(LN(h))`` with A a :class:`moekit.merging.SMEAR` layer, and a trainable linear head."""

    def __init__(self, in_dim: int, dim: int, layers: int, num_experts: int, hidden: int, classes: int = 10, **smear):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.embed.requires_grad_(False)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.adapters = nn.ModuleList(
            SMEAR(dim, num_experts, experts=MLP(hidden_dim=hidden, activation="silu"), **smear) for _ in range(layers)
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x_BI: Tensor, task: Tensor | None = None) -> Tensor:
        h = F.gelu(self.embed(x_BI))
        for norm, adapter in zip(self.norms, self.adapters):
            h = h + adapter(norm(h), task=task)
        return self.head(h)
