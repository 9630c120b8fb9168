"""Handwritten digits a person can judge: scikit-learn's `load_digits` (1,797 real 8x8 scans, 10 classes, shipped
inside the scikit-learn wheel; nothing is downloaded), as `--data sklearn:digits`.

Each 8x8 scan (ink 0..16) is drawn dark on white and upscaled (bilinear) to image_size², as an RGB image. A fixed,
class-stratified 10% is held out (180 digits): neither the tokenizer nor the prior ever sees it. Training images are
the other scans, each shifted by up to SHIFT pixels (a function of (seed, index), as the photo crops); no flips,
which would turn digits into other shapes.

`digit_features` maps images back to the 8x8, 0..16 space of the scans, so a classifier fitted on the training scans
(the demo's held-out judge, scripts/demo_digits.py) can read generated digits.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from movq_deploy.training.folder import to_tensor
from movq_deploy.training.source import DataSource

SOURCE = "sklearn:digits"
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 0
SHIFT = 1  # pixels at image_size: a quarter of an original pixel at 32²


def digit_images(scans: np.ndarray, image_size: int) -> np.ndarray:
    """float [n, 8, 8] ink 0..16 -> uint8 [n, S, S, 3]: dark ink on white, bilinear upscale."""
    paper = (255.0 - scans * (255.0 / 16.0)).clip(0, 255).astype(np.float32)
    big = [np.asarray(Image.fromarray(p, mode="F").resize((image_size, image_size), Image.BILINEAR)) for p in paper]
    grey = np.stack(big).round().clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def digit_features(images: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3] -> float [n, 64]: grey, inverted to ink 0..16, box-averaged down to 8x8 (the scans' space)."""
    n, size = len(images), images.shape[1]
    ink = (255.0 - images.astype(np.float64).mean(-1)) * (16.0 / 255.0)  # (n, S, S)
    cell = size // 8
    return ink.reshape(n, 8, cell, 8, cell).mean(axis=(2, 4)).reshape(n, 64)


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The image moved by (dy, dx) pixels, the uncovered border filled with white paper."""
    out = np.full_like(image, 255)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[max(-dy, 0):h - max(dy, 0),
                                                                        max(-dx, 0):w - max(dx, 0)]
    return out


class DigitsData(DataSource):
    """The digits and their split, a DataSource (movq_deploy.training.source)."""

    split = "digits"
    source = SOURCE

    def __init__(self, image_size: int):
        from sklearn.datasets import load_digits

        if image_size % 8:
            raise ValueError(f"the digits need an image size divisible by 8 (the scans are 8x8), got {image_size}")
        digits = load_digits()
        self.image_size = image_size
        self.class_names = [str(d) for d in range(10)]
        order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
        held = np.zeros(len(order), dtype=bool)
        for label in range(10):  # the first 10% of each class, in the shuffled order
            members = order[digits.target[order] == label]
            held[members[:round(HELD_OUT_FRACTION * len(members))]] = True
        self.train_scans, self.train_labels = digits.images[~held], digits.target[~held].astype(np.int64)
        self.eval_scans, self.eval_labels = digits.images[held], digits.target[held].astype(np.int64)
        self.train_images = digit_images(self.train_scans, image_size)
        self.eval_images = digit_images(self.eval_scans, image_size)

    def train_set(self, seed: int = 0, length: int = 4096) -> "ShiftedDigits":
        return ShiftedDigits(self, seed, length)

    def eval_set(self) -> "HeldOutDigits":
        return HeldOutDigits(self)

    def sizes(self) -> dict:
        return {"train_pictures": len(self.train_images), "eval_crops": len(self.eval_images)}


class ShiftedDigits(Dataset):
    """Training digit i: a digit drawn at random, shifted by up to SHIFT pixels; a function of (seed, i) only."""

    def __init__(self, data: DigitsData, seed: int, length: int):
        self.data, self.seed, self.length = data, seed, length

    def __len__(self) -> int:
        return self.length

    def crop(self, index: int) -> "tuple[np.ndarray, int]":
        rng = np.random.default_rng([self.seed, index])
        pick = int(rng.integers(len(self.data.train_images)))
        dy, dx = (int(v) for v in rng.integers(-SHIFT, SHIFT + 1, size=2))
        return shifted(self.data.train_images[pick], dy, dx), int(self.data.train_labels[pick])

    def __getitem__(self, index: int) -> "tuple[torch.Tensor, int]":
        image, label = self.crop(index)
        return to_tensor(image), label

    def batch(self, indices) -> "tuple[torch.Tensor, torch.Tensor]":
        crops = [self.crop(int(i)) for i in indices]
        return to_tensor(np.stack([c[0] for c in crops])), torch.tensor([c[1] for c in crops], dtype=torch.int64)


class HeldOutDigits(Dataset):
    """The held-out digits, unshifted."""

    def __init__(self, data: DigitsData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data.eval_images)

    def crop(self, index: int) -> "tuple[np.ndarray, int]":
        return self.data.eval_images[index], int(self.data.eval_labels[index])

    def __getitem__(self, index: int) -> "tuple[torch.Tensor, int]":
        image, label = self.crop(index)
        return to_tensor(image), label

    def arrays(self) -> "tuple[np.ndarray, np.ndarray]":
        return self.data.eval_images.copy(), self.data.eval_labels.copy()
