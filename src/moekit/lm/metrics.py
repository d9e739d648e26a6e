"""Perplexity of a causal LM on fixed token blocks (the same blocks for every model, so numbers compare)."""

from __future__ import annotations

import math
from collections.abc import Callable

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

    def nll_sum(rows: slice) -> float:
        x = blocks_NT[rows]
        lp = torch.log_softmax(model(input_ids=x).logits.float()[:, :-1], dim=-1)
        return -float(lp.gather(-1, x[:, 1:, None]).sum())

    return batched_perplexity(model, blocks_NT, nll_sum, batch_size)


def batched_perplexity(model: nn.Module, ids_NT: Tensor, nll_sum: Callable[[slice], float], batch_size: int) -> float:
    """exp(total NLL / predicted positions), ``nll_sum(rows)`` giving the summed next-token NLL of ``ids_NT[rows]``;
    ``model`` is in eval mode meanwhile (its training flag is restored)."""
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, ids_NT.shape[0], batch_size):
            rows = slice(i, i + batch_size)
            nll += nll_sum(rows)
            count += ids_NT[rows, 1:].numel()
    finally:
        model.train(was)
    return math.exp(nll / count)
