"""Run only the last blocks of a transformers decoder on cached hidden states.

When only the last blocks of a pretrained model change (MoEfied, fine-tuned), the first ``start`` blocks compute the
same hidden states for every variant: :func:`hidden_before` runs them once, and :func:`tail_view` makes the model
skip them, so ``model(inputs_embeds=h_BTD)`` runs blocks ``start..L-1``, the final norm and the head. The causal
mask and rotary positions are rebuilt from ``h`` exactly as for a full forward, so the tail output equals the full
model's (checked in ``tests/test_moefy.py``). Works for decoders whose ``model.model.layers`` is the block list and
whose forward accepts ``inputs_embeds`` (Llama, Qwen, Mistral, ...).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .metrics import batched_perplexity


class _Stop(Exception):
    pass


def _blocks(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: expected the decoder blocks at model.model.layers")
    return layers


@torch.no_grad()
def hidden_before(model: nn.Module, ids_BT: Tensor, start: int, batch_size: int = 4) -> Tensor:
    """The hidden states entering block ``start`` (``(B, T, D)``), computed by the model's own forward and cut
    there (the remaining blocks are not run)."""
    blocks = _blocks(model)
    if not 0 <= start < len(blocks):
        raise ValueError(f"hidden_before: start must be in [0, {len(blocks)}), got {start}")
    got: list[Tensor] = []

    def hook(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        got.append(h.detach().clone())
        raise _Stop

    handle = blocks[start].register_forward_pre_hook(hook, with_kwargs=True)
    was = model.training
    model.eval()
    try:
        for i in range(0, ids_BT.shape[0], batch_size):
            try:
                model(input_ids=ids_BT[i:i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(got)


@contextlib.contextmanager
def tail_view(model: nn.Module, start: int):
    """Inside: ``model.model.layers`` holds only blocks ``start..`` (the same module objects); feed it
    ``inputs_embeds`` from :func:`hidden_before` with ``use_cache=False``."""
    inner = model.model
    full = inner.layers
    inner.layers = nn.ModuleList(list(full)[start:])
    try:
        yield model
    finally:
        inner.layers = full


def tail_loss(model: nn.Module, start: int, h_BTD: Tensor, ids_BT: Tensor) -> Tensor:
    """Mean next-token cross-entropy of the tail from block ``start`` on ``h_BTD`` (the rows of ``ids_BT``)."""
    with tail_view(model, start):
        logits = model(inputs_embeds=h_BTD, use_cache=False).logits.float()
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids_BT[:, 1:].reshape(-1))


@torch.no_grad()
def tail_perplexity(model: nn.Module, start: int, h_NTD: Tensor, ids_NT: Tensor, batch_size: int = 4) -> float:
    """Perplexity as :func:`moekit.lm.metrics.perplexity`, from cached hidden states entering block ``start``."""

    def nll_sum(rows: slice) -> float:
        return float(tail_loss(model, start, h_NTD[rows], ids_NT[rows])) * ids_NT[rows, 1:].numel()

    return batched_perplexity(model, ids_NT, nll_sum, batch_size)
