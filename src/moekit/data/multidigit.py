"""MultiDigit: a MultiMNIST-style multi-task vision set built from scikit-learn's bundled digits.

Source images: ``sklearn.datasets.load_digits`` (1,797 8x8 greyscale digits, values 0..16, the UCI "Optical
Recognition of Handwritten Digits" test set; shipped inside the scikit-learn wheel, so nothing is downloaded).

Construction (all randomness from ``numpy.random.default_rng(seed)``):

1. **Source split.** Each class's images are shuffled and the first ``round(test_fraction * n_class)`` go to the
   test pool, the rest to the train pool. Train canvases use only train-pool images and test canvases only
   test-pool images, so the splits share no source image.
2. **Canvas.** A ``12 x 20`` black canvas gets two different pool digits (a uniform pair; intensity scaled to
   [0, 1]): the *left* digit with its top-left corner at row ``U{0..4}``, column ``U{0..3}``; the *right* digit at
   row ``U{0..4}``, column ``U{9..12}``. The two 8x8 boxes may overlap by up to 2 columns; pixels combine by
   maximum.
3. **Targets.** ``left``: class of the left digit (10 classes). ``right``: class of the right digit (10 classes).
   ``seg``: per pixel 0 = background (combined intensity < 0.25), 1 = left digit, 2 = right digit (whichever
   digit is brighter at that pixel; ties go to the left one).

Shapes: N canvases, H x W canvas, images (N, 1, H, W) float32 in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CANVAS_HW = (12, 20)
DIGIT = 8
LEFT_COLS = (0, 3)  # inclusive range of the left digit's first column
RIGHT_COLS = (9, 12)
ROWS = (0, 4)
FOREGROUND = 0.25


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # "classify" (one label per image) or "segment" (one label per pixel)
    num_classes: int


MULTIDIGIT_TASKS = (
    TaskInfo("left", "classify", 10),
    TaskInfo("right", "classify", 10),
    TaskInfo("seg", "segment", 3),
)


@dataclass(frozen=True)
class MultiDigit:
    images: Tensor  # (N, 1, H, W) float32 in [0, 1]
    targets: dict[str, Tensor]  # task name -> (N,) class ids, or (N, H, W) pixel class ids
    sources: Tensor  # (N, 2) indices into load_digits() of the left and right digit
    tasks: tuple[TaskInfo, ...] = MULTIDIGIT_TASKS

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Tensor) -> "MultiDigit":
        return MultiDigit(self.images[index], {k: v[index] for k, v in self.targets.items()}, self.sources[index],
                          self.tasks)


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MultiDigit needs scikit-learn for its bundled digit images: pip install scikit-learn "
            "(or pip install 'moekit[demo]')"
        ) from e
    d = load_digits()
    return d.images.astype("float32") / 16.0, d.target.astype("int64")


def split_sources(labels, test_fraction: float, rng) -> tuple[list[int], list[int]]:
    """Per-class split of source image indices into disjoint (train, test) pools."""
    import numpy as np

    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return sorted(train), sorted(test)


def _compose(digits, labels, pool: list[int], n: int, rng) -> MultiDigit:
    import numpy as np

    H, W = CANVAS_HW
    pool_arr = np.asarray(pool)
    first = rng.integers(0, len(pool_arr), size=n)
    second = (first + rng.integers(1, len(pool_arr), size=n)) % len(pool_arr)  # a different image
    pairs = np.stack([pool_arr[first], pool_arr[second]], axis=1)
    rows = rng.integers(ROWS[0], ROWS[1] + 1, size=(n, 2))
    left_x = rng.integers(LEFT_COLS[0], LEFT_COLS[1] + 1, size=n)
    right_x = rng.integers(RIGHT_COLS[0], RIGHT_COLS[1] + 1, size=n)
    left = np.zeros((n, H, W), dtype="float32")
    right = np.zeros((n, H, W), dtype="float32")
    for i in range(n):
        left[i, rows[i, 0]:rows[i, 0] + DIGIT, left_x[i]:left_x[i] + DIGIT] = digits[pairs[i, 0]]
        right[i, rows[i, 1]:rows[i, 1] + DIGIT, right_x[i]:right_x[i] + DIGIT] = digits[pairs[i, 1]]
    image = np.maximum(left, right)
    seg = np.where(image < FOREGROUND, 0, np.where(left >= right, 1, 2)).astype("int64")
    return MultiDigit(
        images=torch.from_numpy(image).unsqueeze(1),
        targets={
            "left": torch.from_numpy(labels[pairs[:, 0]]),
            "right": torch.from_numpy(labels[pairs[:, 1]]),
            "seg": torch.from_numpy(seg),
        },
        sources=torch.from_numpy(pairs.astype("int64")),
    )


def make_multidigit(
    num_train: int = 6000, num_test: int = 1000, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[MultiDigit, MultiDigit]:
    """Build the (train, test) MultiDigit sets; deterministic in ``seed``. See the module docstring."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"make_multidigit: num_train and num_test must be >= 1, got {num_train}, {num_test}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"make_multidigit: test_fraction must be in (0, 1), got {test_fraction}")
    import numpy as np

    digits, labels = _load_digits()
    rng = np.random.default_rng(seed)
    train_pool, test_pool = split_sources(labels, test_fraction, rng)
    return _compose(digits, labels, train_pool, num_train, rng), _compose(digits, labels, test_pool, num_test, rng)
