"""Token ids for the CLI: text through the checkpoint's tokenizer, or explicit ids (for random test checkpoints,
which ship no tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_tokenizer(model_dir):
    """The checkpoint's tokenizer, or None when it ships none."""
    d = Path(model_dir)
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


def parse_ids(text: str, what: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what}: expected whitespace- or comma-separated integer token ids") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"{what}: expected at least one non-negative token id")
    return ids


def file_token_ids(path, tokenizer) -> torch.Tensor:
    """A 1-D tensor of token ids from ``path``: a ``.pt`` tensor, a text file of integers (``.ids``/``.txt`` of ids),
    or any text file (then the checkpoint must have a tokenizer)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--calib={str(path)!r}: no such file")
    if p.suffix == ".pt":
        t = torch.load(p)
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"--calib={str(path)!r}: expected an integer tensor of token ids")
        return t.flatten().long()
    text = p.read_text()
    try:
        return torch.tensor(parse_ids(text, f"--calib={str(path)!r}"))
    except ValueError:
        if tokenizer is None:
            raise ValueError(f"--calib={str(path)!r} is text but the checkpoint has no tokenizer; pass token ids "
                             f"(integers, or a .pt tensor)") from None
        return torch.tensor(tokenizer(text)["input_ids"])
