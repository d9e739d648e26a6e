"""MultiDigit: splits share no source image, labels and masks follow the construction, deterministic in seed."""

import pytest
import torch

pytest.importorskip("sklearn")

from moekit.data import MULTIDIGIT_TASKS, make_multidigit  # noqa: E402
from moekit.data.multidigit import CANVAS_HW, FOREGROUND, _load_digits  # noqa: E402


@pytest.fixture(scope="module")
def sets():
    return make_multidigit(600, 300, seed=3)


def test_splits_share_no_source_image(sets):
    train, test = sets
    a, b = set(train.sources.flatten().tolist()), set(test.sources.flatten().tolist())
    assert a and b and not (a & b)
    # the pools also differ as images, not only as indices (load_digits has no exact duplicates across them)
    digits, _ = _load_digits()
    train_imgs = {digits[i].tobytes() for i in a}
    assert not any(digits[i].tobytes() in train_imgs for i in b)


def test_shapes_and_ranges(sets):
    train, test = sets
    H, W = CANVAS_HW
    assert train.images.shape == (600, 1, H, W) and test.images.shape == (300, 1, H, W)
    assert train.images.dtype == torch.float32 and 0 <= float(train.images.min()) and float(train.images.max()) <= 1
    assert [t.name for t in train.tasks] == [t.name for t in MULTIDIGIT_TASKS] == ["left", "right", "seg"]
    assert train.targets["seg"].shape == (600, H, W)
    assert set(train.targets["seg"].unique().tolist()) == {0, 1, 2}
    assert (train.sources[:, 0] != train.sources[:, 1]).all()


def test_labels_follow_sources_and_masks_follow_pixels(sets):
    train, _ = sets
    digits, labels = _load_digits()
    assert torch.equal(train.targets["left"], torch.from_numpy(labels[train.sources[:, 0].numpy()]))
    assert torch.equal(train.targets["right"], torch.from_numpy(labels[train.sources[:, 1].numpy()]))
    img, seg = train.images[:, 0], train.targets["seg"]
    assert torch.equal(seg == 0, img < FOREGROUND)
    # the left digit lies in columns 0..10, the right one in 9..19
    assert not (seg[:, :, 11:] == 1).any() and not (seg[:, :, :9] == 2).any()
    # each digit's intensity mass matches its source image (up to pixels the other digit covers)
    for i in range(5):
        left_mass = float(torch.from_numpy(digits[int(train.sources[i, 0])]).sum())
        assert float(img[i][seg[i] == 1].sum()) <= left_mass + 1e-5


def test_deterministic_and_seed_dependent():
    a, _ = make_multidigit(50, 20, seed=1)
    b, _ = make_multidigit(50, 20, seed=1)
    c, _ = make_multidigit(50, 20, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.sources, b.sources)
    assert not torch.equal(a.sources, c.sources)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_train"):
        make_multidigit(0, 10)
    with pytest.raises(ValueError, match="test_fraction"):
        make_multidigit(10, 10, test_fraction=1.0)
