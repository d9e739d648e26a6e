"""Token streams per domain with train / validation splits, and reproducible random training windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .corpora import load_domain, split_text


@dataclass
class DomainData:
    """Per domain: the training token stream and the validation blocks ``(N, block)``."""

    train: dict[str, Tensor]
    val: dict[str, Tensor]
    block: int

    @property
    def domains(self) -> list[str]:
        return list(self.train)

    def batch(self, step: int, batch_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``(ids_BT, domain_B)``: ``batch_size`` random windows of ``block + 1`` tokens, the domains taking turns;
        a function of ``(seed, step)`` only, so a resumed run sees the same batches."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        names = self.domains
        rows, doms = [], []
        for b in range(batch_size):
            d = (step * batch_size + b) % len(names)
            stream = self.train[names[d]]
            start = int(torch.randint(0, stream.numel() - self.block - 1, (1,), generator=g))
            rows.append(stream[start:start + self.block + 1])
            doms.append(d)
        return torch.stack(rows), torch.tensor(doms)

    def tokens(self) -> dict[str, dict[str, int]]:
        return {d: {"train": int(self.train[d].numel()), "val": int(self.val[d].numel())} for d in self.domains}


def encode(tokenizer, text: str, piece: int = 200_000) -> Tensor:
    """Token ids of ``text`` (encoded in pieces so a tokenizer's length warning never fires)."""
    ids: list[int] = []
    for i in range(0, len(text), piece):
        ids += tokenizer(text[i:i + piece], add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def build_domain_data(tokenizer, texts: dict[str, str], *, block: int, val_fraction: float = 0.05,
                      max_val_blocks: int = 16) -> DomainData:
    """Split each domain's text (:func:`split_text`: validation is interleaved through the corpus), tokenise, and
    cut the validation side into at most ``max_val_blocks`` blocks of ``block + 1`` tokens."""
    train, val = {}, {}
    for name, text in texts.items():
        tr, va = split_text(text, (1 - val_fraction, val_fraction))
        train[name] = encode(tokenizer, tr)
        v = encode(tokenizer, va)
        n = min(max_val_blocks, v.numel() // (block + 1))
        if n < 1 or train[name].numel() < 4 * (block + 1):
            raise ValueError(f"build_domain_data: domain {name!r} is too short for block={block}")
        val[name] = v[: n * (block + 1)].reshape(n, block + 1)
    return DomainData(train, val, block)


def load_texts(domains: list[str], max_chars: int | None) -> dict[str, str]:
    """Each domain's text (see :mod:`moekit.lm.corpora`), cut to ``max_chars``."""
    return {d: load_domain(d, max_chars) for d in domains}
