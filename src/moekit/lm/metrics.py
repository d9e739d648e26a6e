"""Perplexity of a causal LM on fixed token blocks (the same blocks for every model, so numbers compare)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def token_blocks(ids: list[int] | Tensor, block: int, max_blocks: int | None = None) -> Tensor:
    """Cut a token sequence into ``(N, block)`` rows (the remainder is dropped)."""
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = t.numel() // block
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"token_blocks: {t.numel()} tokens do not fill one block of {block}")
    return t[: n * block].reshape(n, block)


@torch.no_grad()
def perplexity(model: nn.Module, blocks_NT: Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over every predicted position of the rows of ``blocks_NT`` (each row is scored
    independently; position 0 of each row is context only). ``model(input_ids=...)`` must return ``.logits``."""
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, blocks_NT.shape[0], batch_size):
            x = blocks_NT[i:i + batch_size]
            logits = model(input_ids=x).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= float(lp.gather(-1, x[:, 1:, None]).sum())
            count += x[:, 1:].numel()
    finally:
        model.train(was)
    return math.exp(nll / count)
