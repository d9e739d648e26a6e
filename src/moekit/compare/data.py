"""Data that ships with installed packages, so ``moekit compare`` runs offline and downloads nothing.

- :func:`stdlib_text`: bytes of the Python standard library's own ``.py`` sources (test folders skipped), in a
  fixed file order, for a byte-level language model (vocabulary 256).
- :func:`digits_domains`: scikit-learn's bundled 8x8 digits (1,797 images) seen through D fixed per-domain
  transformations, for SMEAR vs tag routing (the domain id is the tag). Needs scikit-learn (imported lazily).
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


def stdlib_text(max_bytes: int = 2_000_000) -> bytes:
    """Up to ``max_bytes`` of the standard library's ``.py`` files, sorted by path, test folders excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "idle_test", "site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            data = (Path(dirpath) / name).read_bytes()
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
    if not chunks:
        raise RuntimeError(f"no .py files found under the standard library at {root}")
    return b"".join(chunks)[:max_bytes]


@dataclass(frozen=True)
class TextData:
    train: Tensor  # uint8 -> long byte ids
    val: Tensor
    vocab: int = 256

    def batch(self, split: str, batch: int, seq: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(seq + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]


def text_data(max_bytes: int = 2_000_000, val_fraction: float = 0.1) -> TextData:
    ids = torch.frombuffer(bytearray(stdlib_text(max_bytes)), dtype=torch.uint8).long()
    n_val = max(1, int(ids.numel() * val_fraction))
    return TextData(train=ids[:-n_val], val=ids[-n_val:])


DOMAINS = ("identity", "inverted", "permuted", "permuted_inverted", "rot90", "shifted_permuted")


def _domain_transform(name: str, x_N88: Tensor, gen: torch.Generator) -> Tensor:
    """One fixed transformation of 8x8 images with values in [0, 1]; permutations are drawn once from ``gen``."""
    flat = x_N88.reshape(-1, 64)
    if name == "identity":
        return flat
    if name == "inverted":
        return 1.0 - flat
    if name == "permuted":
        return flat[:, torch.randperm(64, generator=gen)]
    if name == "permuted_inverted":
        return 1.0 - flat[:, torch.randperm(64, generator=gen)]
    if name == "rot90":
        return torch.rot90(x_N88, 1, dims=(1, 2)).reshape(-1, 64)
    if name == "shifted_permuted":
        return (flat[:, torch.randperm(64, generator=gen)] - 0.5) * 2.0
    raise ValueError(f"unknown domain {name!r}; valid: {', '.join(DOMAINS)}")


@dataclass(frozen=True)
class DomainData:
    x_train: Tensor  # (N, 64) float
    y_train: Tensor  # (N,) class 0..9
    d_train: Tensor  # (N,) domain id
    x_test: Tensor
    y_test: Tensor
    d_test: Tensor
    domains: tuple[str, ...]


def digits_domains(num_domains: int = 6, test_fraction: float = 0.25, seed: int = 0) -> DomainData:
    """Every digit image in every domain; train/test split by *image* so no test image is seen in any domain."""
    if not 1 <= num_domains <= len(DOMAINS):
        raise ValueError(f"num_domains must be in [1, {len(DOMAINS)}], got {num_domains}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from e
    X, y = load_digits(return_X_y=True)
    gen = torch.Generator().manual_seed(seed)
    x_N88 = torch.tensor(X, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    y_N = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y_N), generator=gen)
    n_test = int(len(y_N) * test_fraction)
    parts = {"test": order[:n_test], "train": order[n_test:]}
    out: dict[str, list[Tensor]] = {k: [] for k in ("x_train", "y_train", "d_train", "x_test", "y_test", "d_test")}
    names = DOMAINS[:num_domains]
    for d, name in enumerate(names):
        xd = _domain_transform(name, x_N88, gen)
        for split, idx in parts.items():
            out[f"x_{split}"].append(xd[idx])
            out[f"y_{split}"].append(y_N[idx])
            out[f"d_{split}"].append(torch.full((len(idx),), d, dtype=torch.long))
    return DomainData(**{k: torch.cat(v) for k, v in out.items()}, domains=names)
