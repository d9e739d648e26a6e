"""EDA-style text augmentation (Wei & Zou 2019): random swap, random deletion, random insertion.

No synonym dictionary is used (nothing is downloaded): random insertion inserts a copy of a word already in the
sentence, and synonym replacement is left out. ``alpha`` is the fraction of words changed, as in EDA.
"""

from __future__ import annotations

import random

OPS = ("swap", "delete", "insert")


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(n if len(words) > 1 else 0):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def random_insertion(words: list[str], n: int, rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(n if words else 0):
        words.insert(rng.randrange(len(words) + 1), rng.choice(words))
    return words


def eda(text: str, rng: random.Random, alpha: float = 0.1, ops: tuple[str, ...] = OPS) -> str:
    """One augmented version of ``text``: one operation, chosen at random from ``ops``, changing about
    ``alpha * len(words)`` words (at least one)."""
    bad = set(ops) - set(OPS)
    if bad or not ops:
        raise ValueError(f"eda: unknown operations {sorted(bad)}; valid: {', '.join(OPS)}")
    words = text.split()
    n = max(1, int(alpha * len(words)))
    op = rng.choice(ops)
    if op == "swap":
        words = random_swap(words, n, rng)
    elif op == "delete":
        words = random_deletion(words, alpha, rng)
    else:
        words = random_insertion(words, n, rng)
    return " ".join(words)
