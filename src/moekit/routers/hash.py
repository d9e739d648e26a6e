"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", NeurIPS 2021, arXiv:2106.04426).

No learned router: each token goes to one expert chosen by a fixed hash of its *token id*, with weight 1. With a
vocabulary size, the hash is a fixed random table that gives every expert the same number of vocabulary ids (the
paper's random hash, balanced over the vocabulary, not over token frequency); without one, a multiplicative
(Knuth) hash of the id. The token ids are passed through the layer's ``task`` argument:
``layer(x, task=token_ids)`` with ``token_ids`` of x's leading shape.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..assignment import Assignment
from ..spec import register_spec
from .base import RouterSpec

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

    vocab_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"Hash: vocab_size must be >= 1, got {self.vocab_size}")

    def build(self, dim: int, num_experts: int) -> "HashRouter":
        return HashRouter(num_experts, self)


class HashRouter(nn.Module):
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
        ids = ids.long()
        if self.table_V is not None:
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
                raise ValueError(f"Hash: token ids must be in [0, {self.spec.vocab_size})")
            return self.table_V[ids]
        return ((ids * _KNUTH + self.spec.seed) % (1 << 32)) % self.num_experts

    def forward(self, x_TD: Tensor, task: Tensor | None = None) -> Assignment:
        T = x_TD.shape[0]
        if not isinstance(task, Tensor):
            raise ValueError("Hash routing needs the token ids: call layer(x, task=token_ids)")
        if task.numel() != T:
            raise ValueError(f"Hash: got {task.numel()} token ids for {T} tokens; pass one id per token")
        idx_T1 = self.expert_of(task.reshape(T).to(x_TD.device)).unsqueeze(1)
        return Assignment.from_topk(idx_T1, x_TD.new_ones(T, 1), self.num_experts)

    def extra_repr(self) -> str:
        return f"vocab_size={self.spec.vocab_size}, seed={self.spec.seed}"
