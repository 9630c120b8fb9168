"""Training data: the photographs shipped inside scikit-image (the embedded default) or any folder of images.

Two ways to hold data out for evaluation, chosen by how much there is:
- "strip" (a few large photos, e.g. the embedded default): each photo is resized so its shorter side is
  3 * image_size; the right-most `image_size` columns are held out (a fixed set of crops along that strip), and
  training crops come from the columns left of it, with a small gap so no pixel is shared.
- "images" (a folder with >= 10 images and >= 2 per class): the last ~10% of each class (sorted by file name) is
  held out whole; each held-out image gives one centre crop.
Training crops are random (position and horizontal flip), drawn from a numpy stream seeded by (seed, index), so a
crop depends on its index only: resuming or splitting a batch across DDP ranks sees the same crops.

Images come out as float tensors [3, S, S] in [-1, 1] with an int label (the class: the sub-folder, or for the
embedded data the photo a crop came from). Labels are 0 for every crop when the data has no classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from movq_deploy.training.folder import TRAIN_SCALE, FolderData, is_images_split, load_index, to_tensor
from movq_deploy.training.shards import ShardData, is_shard_spec
from movq_deploy.training.source import DataSource
from movq_deploy.training.digits import SOURCE as DIGITS_SOURCE
from movq_deploy.training.digits import DigitsData

# Real colour photographs in skimage/data (synthetic charts, greyscale and RGBA files are left out; of the
# motorcycle stereo pair only the left view is used, the right one shows the same scene).
EMBEDDED_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "motorcycle": "motorcycle_left.png",
    "hubble": "hubble_deep_field.jpg",
    "retina": "retina.jpg",
    "ihc": "ihc.png",
}
STRIP_SCALE = 3  # strip split: shorter side = 3 * image_size, so a crop holds about a third of the photo
EVAL_CROPS_PER_PHOTO = 6


@dataclass
class Picture:
    pixels: np.ndarray  # (H, W, 3) uint8, already resized for its split
    label: int
    name: str


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in ~[-1, 1] -> uint8 [..., H, W, 3] (clamped, rounded), as the decoder graph does."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def _resize_shorter(image: Image.Image, shorter: int) -> np.ndarray:
    w, h = image.size
    scale = shorter / min(w, h)
    size = (max(shorter, round(w * scale)), max(shorter, round(h * scale)))
    return np.asarray(image.resize(size, Image.BICUBIC), dtype=np.uint8)


def _read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


class ImageData(DataSource):
    """A loaded collection of pictures and its train / held-out split.

    `train_set(seed, length)` -> RandomCrops; `eval_set()` -> HeldOutCrops; `class_names`; `summary()`.
    """

    def __init__(self, pictures: list[tuple[Image.Image, int, str]], class_names: list[str], image_size: int,
                 split: str, source: str):
        if split not in ("strip", "images"):
            raise ValueError(f"split must be 'strip' or 'images', got {split!r}")
        self.image_size = image_size
        self.class_names = class_names
        self.split = split
        self.source = source
        self.train_pictures: list[Picture] = []
        self.eval_pictures: list[Picture] = []
        if split == "strip":
            for image, label, name in pictures:
                pic = Picture(_resize_shorter(image, STRIP_SCALE * image_size), label, name)
                self.train_pictures.append(pic)
                self.eval_pictures.append(pic)
        else:
            for image, label, name, held_out in self._hold_out_images(pictures):
                if held_out:
                    self.eval_pictures.append(Picture(_resize_shorter(image, image_size), label, name))
                else:
                    shorter = round(TRAIN_SCALE * image_size)
                    self.train_pictures.append(Picture(_resize_shorter(image, shorter), label, name))

    @staticmethod
    def _hold_out_images(pictures):
        by_class: dict[int, list] = {}
        for item in sorted(pictures, key=lambda p: p[2]):
            by_class.setdefault(item[1], []).append(item)
        for items in by_class.values():
            held = max(1, len(items) // 10)
            for i, (image, label, name) in enumerate(items):
                yield image, label, name, i >= len(items) - held

    # The strip geometry, shared by the training crops and the held-out crops (and checked by the tests).
    def train_columns(self, pic: Picture) -> int:
        """Width of the training region (columns [0, width)) of a picture."""
        if self.split == "images":
            return pic.pixels.shape[1]
        return pic.pixels.shape[1] - self.image_size - self.image_size // 8

    def eval_boxes(self, pic: Picture) -> list[tuple[int, int]]:
        """(top, left) of each held-out crop of a held-out picture."""
        h, w, _ = pic.pixels.shape
        s = self.image_size
        if self.split == "images":
            return [((h - s) // 2, (w - s) // 2)]
        tops = np.linspace(0, h - s, EVAL_CROPS_PER_PHOTO).round().astype(int)
        return [(int(t), w - s) for t in tops]

    def train_set(self, seed: int = 0, length: int = 4096) -> "RandomCrops":
        return RandomCrops(self, seed, length)

    def eval_set(self) -> "HeldOutCrops":
        return HeldOutCrops(self)

    def sizes(self) -> dict:
        return {"train_pictures": len(self.train_pictures), "eval_crops": len(self.eval_set())}


class RandomCrops(Dataset):
    """Random crop + horizontal flip of a random training picture; crop i is a function of (seed, i) only.

    `len` is a nominal epoch (for DataLoader); any index >= 0 is valid and gives a fresh crop.
    """

    def __init__(self, data: ImageData, seed: int, length: int):
        self.data, self.seed, self.length = data, seed, length

    def __len__(self) -> int:
        return self.length

    def crop(self, index: int) -> tuple[np.ndarray, int]:
        """uint8 [S, S, 3] and its label."""
        rng = np.random.default_rng([self.seed, index])
        pic = self.data.train_pictures[rng.integers(len(self.data.train_pictures))]
        s = self.data.image_size
        top = rng.integers(pic.pixels.shape[0] - s + 1)
        left = rng.integers(self.data.train_columns(pic) - s + 1)
        patch = pic.pixels[top:top + s, left:left + s]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        return patch, pic.label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        patch, label = self.crop(index)
        return to_tensor(patch), label

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """float [B, 3, S, S], int64 [B] for the given crop indices."""
        crops = [self.crop(int(i)) for i in indices]
        images = to_tensor(np.stack([c[0] for c in crops]))
        return images, torch.tensor([c[1] for c in crops], dtype=torch.int64)


class HeldOutCrops(Dataset):
    """The fixed evaluation crops (no pixel shared with any training crop)."""

    def __init__(self, data: ImageData):
        self.data = data
        self.items = [(pic, top, left) for pic in data.eval_pictures for top, left in data.eval_boxes(pic)]

    def __len__(self) -> int:
        return len(self.items)

    def crop(self, index: int) -> tuple[np.ndarray, int]:
        pic, top, left = self.items[index]
        s = self.data.image_size
        return pic.pixels[top:top + s, left:left + s], pic.label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        patch, label = self.crop(index)
        return to_tensor(patch), label

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All held-out crops: uint8 [n, S, S, 3] and int64 labels [n]."""
        crops = [self.crop(i) for i in range(len(self))]
        return np.stack([c[0] for c in crops]), np.array([c[1] for c in crops], dtype=np.int64)


def embedded_data(image_size: int) -> ImageData:
    """The colour photographs inside the installed scikit-image package (nothing is downloaded)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    pictures = []
    for label, (name, file) in enumerate(EMBEDDED_PHOTOS.items()):
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(f"scikit-image's bundled photo {path} is missing; reinstall scikit-image")
        pictures.append((_read_rgb(path), label, name))
    return ImageData(pictures, list(EMBEDDED_PHOTOS), image_size, "strip", "skimage.data")


def folder_data(root: "str | Path", image_size: int, index_cache: "str | Path | None" = None) -> "ImageData | FolderData":
    """Every image under `root`; a class is a top-level sub-folder (images all at the top level: no classes).

    The file list comes from a cached index (folder.py). With >= 10 images and >= 2 per class, whole images are
    held out and images are decoded on demand (in the DataLoader's workers); fewer images use the strip split and
    are read here.
    """
    index = load_index(root, index_cache)
    if is_images_split(index):
        return FolderData(index, image_size)
    pictures = [(_read_rgb(Path(index.root) / f), label, f) for f, label in zip(index.files, index.labels)]
    return ImageData(pictures, index.class_names, image_size, "strip", str(root))


def load_data(data_dir: "str | Path | None", image_size: int,
              index_cache: "str | Path | None" = None) -> "ImageData | FolderData | ShardData | DigitsData":
    """`--data DIR` (or tar shards, see shards.py; or "sklearn:digits", scikit-learn's handwritten digits) if given,
    else the embedded photographs."""
    if data_dir is None:
        return embedded_data(image_size)
    if str(data_dir) == DIGITS_SOURCE:
        return DigitsData(image_size)
    if is_shard_spec(data_dir):
        return ShardData(str(data_dir), image_size)
    return folder_data(data_dir, image_size, index_cache)
