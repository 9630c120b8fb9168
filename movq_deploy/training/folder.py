"""A folder of images read lazily: a cached file index at start, decoding and cropping in the DataLoader's workers.

The index (relative paths, labels, class names) is what a run needs before its first step. Scanning a folder of
70k images walks and stats every entry; the index is therefore cached in a JSON file keyed by the folder's path and
checked against the modification time of every directory in it (adding, removing or renaming a file changes its
directory's mtime), so a second start reads one small file instead of walking the tree. Nothing is decoded at start.

Same classes and split rule as `data.folder_data`: a class is a top-level sub-folder; the last ~10% of each class
(sorted by relative path) is held out whole and gives one centre crop; training image i is resized so its shorter
side is 1.15 * S and cropped at random (position, horizontal flip) from the numpy stream seeded by (seed, index).
Training index i reads image i % N, so the epoch-wise sampler of `loader.py` visits every image once per epoch and
index e * N + i gives a fresh crop of image i in epoch e. JPEGs are decoded at reduced scale when that still covers
the target size (PIL's draft mode), which is most of the decoding time saved on large photos.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from movq_deploy.files import atomic_write_text
from movq_deploy.training.source import DataSource

INDEX_FORMAT = "movq-deploy-file-index-1"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
TRAIN_SCALE = 1.15  # shorter side = 1.15 * image_size before the random crop (as data.TRAIN_SCALE)


def default_cache_dir() -> Path:
    """$MOVQ_DEPLOY_CACHE, else $XDG_CACHE_HOME/movq-deploy, else ~/.cache/movq-deploy."""
    if os.environ.get("MOVQ_DEPLOY_CACHE"):
        return Path(os.environ["MOVQ_DEPLOY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "movq-deploy"


@dataclass
class FileIndex:
    root: str
    files: list[str]  # relative paths, sorted as strings
    labels: list[int]
    class_names: list[str]
    directories: dict[str, int]  # every directory (relative, "." for the root) -> st_mtime_ns when scanned

    def is_current(self) -> bool:
        """True when no directory of the tree changed since the scan (a changed file list changes an mtime)."""
        root = Path(self.root)
        try:
            return all(os.stat(root / d).st_mtime_ns == mtime for d, mtime in self.directories.items())
        except OSError:
            return False


def scan_folder(root: Path) -> FileIndex:
    """Walks `root` once (os.scandir); raises the same one-line errors as data.folder_data."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    files: list[str] = []
    directories: dict[str, int] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        directories[os.path.relpath(folder, root)] = os.stat(folder).st_mtime_ns
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    pending.append(Path(entry.path))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(os.path.relpath(entry.path, root))
    files.sort()
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    nested = [f.split(os.sep)[0] for f in files if os.sep in f]
    if nested and len(nested) != len(files):
        raise ValueError(f"{root} mixes images at its top level with class sub-folders; put every image in a sub-folder")
    class_names = sorted(set(nested))
    label_of = {name: i for i, name in enumerate(class_names)}
    labels = [label_of.get(f.split(os.sep)[0], 0) if nested else 0 for f in files]
    return FileIndex(str(root), files, labels, class_names, directories)


def load_index(root: "str | Path", cache_dir: "str | Path | None" = None) -> FileIndex:
    """The folder's index from the cache when it is current, else a fresh scan (written back to the cache).
    An unwritable cache folder only costs the next start a scan."""
    root = Path(root).resolve()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache_dir / f"index-{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"
    try:
        stored = json.loads(cache.read_text())
        if stored.get("format") == INDEX_FORMAT:
            index = FileIndex(**stored["index"])
            if index.root == str(root) and index.is_current():
                return index
    except (OSError, ValueError, TypeError, KeyError):
        pass  # missing, foreign or stale cache: scan
    index = scan_folder(root)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"format": INDEX_FORMAT, "index": asdict(index)}))
    except OSError:
        pass
    return index


def read_resized(source, shorter: int, name: str = "") -> np.ndarray:
    """uint8 (H, W, 3) of an image file (a path or a binary file object, `name` naming it in errors) with the
    shorter side resized to `shorter` (bicubic); JPEGs decode at reduced scale first."""
    try:
        with Image.open(source) as im:
            im.draft("RGB", (shorter, shorter))  # JPEG only: decode at 1/2, 1/4, 1/8 while still >= the target
            image = im.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {name or source}: {e}") from None
    w, h = image.size
    scale = shorter / min(w, h)
    size = (max(shorter, round(w * scale)), max(shorter, round(h * scale)))
    return np.asarray(image.resize(size, Image.BICUBIC), dtype=np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)


class FolderCrops(Dataset):
    """Training crops; index i (any i >= 0) is a random crop of image i % N, a function of (seed, i) only."""

    def __init__(self, root: str, files: list[str], labels: list[int], image_size: int, seed: int):
        self.root, self.files, self.labels, self.image_size, self.seed = root, files, labels, image_size, seed

    def __len__(self) -> int:
        return len(self.files)

    def crop(self, index: int) -> tuple[np.ndarray, int]:
        """uint8 [S, S, 3] and its label."""
        n = index % len(self.files)
        pixels = read_resized(Path(self.root) / self.files[n], round(TRAIN_SCALE * self.image_size))
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        top = rng.integers(pixels.shape[0] - s + 1)
        left = rng.integers(pixels.shape[1] - s + 1)
        patch = pixels[top:top + s, left:left + s]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        return patch, self.labels[n]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        patch, label = self.crop(index)
        return to_tensor(patch), label

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        crops = [self.crop(int(i)) for i in indices]
        images = torch.stack([to_tensor(c[0]) for c in crops])
        return images, torch.tensor([c[1] for c in crops], dtype=torch.int64)


class HeldOutFiles(Dataset):
    """One centre crop of each held-out image (shorter side resized to S), decoded when asked for."""

    def __init__(self, root: str, files: list[str], labels: list[int], image_size: int):
        self.root, self.files, self.labels, self.image_size = root, files, labels, image_size
        self._arrays: "tuple[np.ndarray, np.ndarray] | None" = None

    def __len__(self) -> int:
        return len(self.files)

    def crop(self, index: int) -> tuple[np.ndarray, int]:
        pixels = read_resized(Path(self.root) / self.files[index], self.image_size)
        h, w, _ = pixels.shape
        s = self.image_size
        top, left = (h - s) // 2, (w - s) // 2
        return pixels[top:top + s, left:left + s], self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        patch, label = self.crop(index)
        return to_tensor(patch), label

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All held-out crops: uint8 [n, S, S, 3] and int64 labels [n] (decoded once, then kept)."""
        if self._arrays is None:
            crops = [self.crop(i) for i in range(len(self))]
            self._arrays = (np.stack([c[0] for c in crops]), np.array([c[1] for c in crops], dtype=np.int64))
        return self._arrays


class FolderData(DataSource):
    """A DataSource (movq_deploy.training.source) over a file index."""

    split = "images"

    def __init__(self, index: FileIndex, image_size: int):
        self.index, self.image_size = index, image_size
        self.class_names = list(index.class_names)
        self.source = index.root
        self.train_files, self.eval_files = hold_out(index.files, index.labels)
        self._eval_set: "HeldOutFiles | None" = None

    def train_set(self, seed: int = 0, length: "int | None" = None) -> FolderCrops:
        files, labels = zip(*self.train_files)
        return FolderCrops(self.index.root, list(files), list(labels), self.image_size, seed)

    def eval_set(self) -> HeldOutFiles:
        if self._eval_set is None:  # one instance, so its decoded crops are kept between evaluations
            files, labels = zip(*self.eval_files)
            self._eval_set = HeldOutFiles(self.index.root, list(files), list(labels), self.image_size)
        return self._eval_set

    def sizes(self) -> dict:
        return {"train_pictures": len(self.train_files), "eval_crops": len(self.eval_files)}


def hold_out(files: list[str], labels: list[int]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held out) lists of (file, label): the last max(1, n // 10) files of each class are held out."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for file, label in sorted(zip(files, labels)):
        by_class.setdefault(label, []).append((file, label))
    train, held = [], []
    for items in by_class.values():
        cut = len(items) - max(1, len(items) // 10)
        train += items[:cut]
        held += items[cut:]
    return train, held


def is_images_split(index: FileIndex) -> bool:
    """data.folder_data's rule: >= 10 images and >= 2 per class hold whole images out; fewer use the strip split."""
    counts = np.bincount(index.labels)
    return len(index.files) >= 10 and counts.min() >= 2
