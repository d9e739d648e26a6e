"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", NeurIPS 2021, arXiv:2106.04426).

No learned router: each token goes to one expert chosen by a fixed hash of its *token id*, with weight 1. With a
vocabulary size, the hash is a fixed random table that gives every expert the same number of vocabulary ids (the
paper's random hash, balanced over the vocabulary, not over token frequency); without one, a multiplicative
(Knuth) hash of the id. The spec declares ``needs_token_ids``; pass the ids as ``layer(x, token_ids=ids)`` with
``ids`` of x's leading shape (``task=ids``, the older spelling, still works).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..assignment import Assignment
from ..spec import register_spec
from ..protocols import RouteContext
from .base import Router, RouterSpec

_KNUTH = 2654435761  # 2^32 / golden ratio


@register_spec("hash", "router")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Hash(RouterSpec):
    """Fixed hash of the token id -> one expert, weight 1 (Roller et al. 2021).

    Args:
        vocab_size: build a balanced random lookup table over this vocabulary (ids must be < vocab_size); None
            hashes the id arithmetically.
        seed: seed of the table (or salt of the arithmetic hash).
    """

    needs_token_ids = True
    vocab_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"Hash: vocab_size must be >= 1, got {self.vocab_size}")

    def flops_per_token(self, dim: int, num_experts: int, *, experts=None, task=None) -> float:
        return 0.0  # a table lookup

    def build(self, dim: int, num_experts: int) -> "HashRouter":
        return HashRouter(num_experts, self)


class HashRouter(Router):
    def __init__(self, num_experts: int, spec: Hash) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts = num_experts
        if spec.vocab_size is not None:
            g = torch.Generator().manual_seed(spec.seed)
            perm = torch.randperm(spec.vocab_size, generator=g)
            table = torch.empty(spec.vocab_size, dtype=torch.long)
            table[perm] = torch.arange(spec.vocab_size) % num_experts
            self.register_buffer("table_V", table)
        else:
            self.table_V = None

    def expert_of(self, ids: Tensor) -> Tensor:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"Hash: token ids must be an integer tensor, got dtype {ids.dtype}")
        ids = ids.long()
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"Hash: token ids must be >= 0, got {int(ids.min())}")
        if self.table_V is not None:
            if ids.numel() and int(ids.max()) >= self.spec.vocab_size:
                raise ValueError(f"Hash: token ids must be in [0, {self.spec.vocab_size}), got {int(ids.max())}")
            return self.table_V[ids]
        return ((ids * _KNUTH + self.spec.seed) % (1 << 32)) % self.num_experts

    def route(self, x_TD: Tensor, ctx: RouteContext) -> Assignment:
        T = x_TD.shape[0]
        ids = ctx.token_ids_T if ctx.token_ids_T is not None else ctx.task  # task=ids: the older spelling
        if not isinstance(ids, Tensor):
            raise ValueError("Hash routing needs the token ids: call layer(x, token_ids=ids)")
        if ids.numel() != T:
            raise ValueError(f"Hash: got {ids.numel()} token ids for {T} tokens; pass one id per token")
        idx_T1 = self.expert_of(ids.reshape(T).to(x_TD.device)).unsqueeze(1)
        return Assignment.from_topk(idx_T1, x_TD.new_ones(T, 1), self.num_experts)

    def extra_repr(self) -> str:
        return f"vocab_size={self.spec.vocab_size}, seed={self.spec.seed}"
