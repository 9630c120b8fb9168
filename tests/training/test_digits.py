"""The digits data (scikit-learn's load_digits): split, rendering, augmentation, and the judge's feature map."""
from __future__ import annotations

import numpy as np
import pytest

from movq_deploy.training.data import load_data
from movq_deploy.training.digits import SHIFT, DigitsData, digit_features, digit_images, shifted


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    return load_data("sklearn:digits", 32)


def test_split_is_stratified_disjoint_and_fixed(digits):
    assert len(digits.train_scans) + len(digits.eval_scans) == 1797
    counts = np.bincount(digits.eval_labels, minlength=10)
    assert counts.min() >= 17 and counts.sum() == len(digits.eval_set())  # ~10% of each class
    train = {scan.tobytes() for scan in digits.train_scans}
    assert not any(scan.tobytes() in train for scan in digits.eval_scans)  # no held-out scan is trained on
    again = DigitsData(32)
    assert np.array_equal(again.eval_labels, digits.eval_labels) and np.array_equal(again.eval_scans, digits.eval_scans)
    assert digits.summary()["source"] == "sklearn:digits" and digits.num_classes == 10


def test_images_are_dark_ink_on_white_and_read_back_to_the_scans(digits):
    images = digits.eval_images
    assert images.shape == (len(digits.eval_scans), 32, 32, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all()  # grey
    assert np.median(images) > 200 and images.min() < 40  # mostly paper, some ink
    features = digit_features(images)
    assert np.abs(features - digits.eval_scans.reshape(-1, 64)).mean() < 1.5  # on the 0..16 ink scale
    blank = digit_images(np.zeros((1, 8, 8)), 16)
    assert (blank == 255).all() and (digit_features(blank) == 0).all()


def test_training_digits_are_shifted_copies_never_flipped(digits):
    train = digits.train_set(seed=3)
    image, label = train.crop(5)
    again, _ = train.crop(5)
    assert np.array_equal(image, again)  # a function of (seed, index)
    matches = [(i, dy, dx) for i, source in enumerate(digits.train_images)
               for dy in range(-SHIFT, SHIFT + 1) for dx in range(-SHIFT, SHIFT + 1)
               if digits.train_labels[i] == label and np.array_equal(shifted(source, dy, dx), image)]
    assert matches
    x, labels = train.batch(range(4))
    assert tuple(x.shape) == (4, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1 and len(labels) == 4


def test_shifted_fills_the_border_with_paper():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    moved = shifted(image, 1, -1)
    assert (moved[0] == 255).all() and (moved[:, -1] == 255).all() and (moved[1:, :-1] == 0).all()


def test_image_size_must_hold_whole_scan_pixels():
    with pytest.raises(ValueError, match="divisible by 8"):
        DigitsData(30)
