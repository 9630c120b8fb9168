"""Training images in tar shards, read with the `webdataset` package (data on object storage, or too many files).

    --data 'shards/train-{000000..000099}.tar'                     # a brace pattern (or one .tar)
    --data 'pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -'   # any stream webdataset opens

Each sample holds an image (jpg / jpeg / png / webp) and optionally an integer class in "cls"; a classes.txt
beside local shards (one name per line) names the classes, else the data is unconditional. The last shard is held
out (up to EVAL_LIMIT images, one centre crop each); training reads the others.

Training crops are an endless stream per rank and worker: a shard drawn at random (numpy, seeded by seed, the
start step, the rank and the worker), its images through a shuffle buffer, each resized to a shorter side of
1.15 * S and cropped at random with a flip, all in the DataLoader's workers. The sampler of loader.py does not
apply (nothing to index); a resumed run goes on with a fresh stream seeded by its start step, so it does not
replay the samples of the interrupted run, and it does not repeat them exactly either.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from movq_deploy.training.folder import TRAIN_SCALE, read_resized, to_tensor
from movq_deploy.training.source import DataSource

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
EVAL_LIMIT = 512
SHUFFLE_BUFFER = 256


def is_shard_spec(spec: "str | Path | None") -> bool:
    return spec is not None and (str(spec).startswith("pipe:") or ".tar" in str(spec))


def expand(spec: str) -> list[str]:
    import webdataset as wds

    urls = list(wds.shardlists.expand_urls(spec))
    if len(urls) < 2:
        raise ValueError(f"--data {spec}: needs at least 2 shards (the last one is held out), found {len(urls)}")
    return urls


def _samples(url: str):
    """(image bytes, class or 0) of every sample of one shard, in order."""
    import webdataset as wds

    for sample in wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False):
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            continue
        label = int(sample["cls"].decode().strip()) if "cls" in sample else 0
        yield sample[key], label


class ShardCrops(IterableDataset):
    def __init__(self, urls: list[str], image_size: int, seed: int):
        self.urls, self.image_size, self.seed = urls, image_size, seed
        self.stream = (0, 0)  # (start step, rank): set by `loader` before the workers start

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, *self.stream, worker.id if worker else 0])
        buffer: list = []
        s = self.image_size
        while True:
            for item in _samples(self.urls[rng.integers(len(self.urls))]):
                buffer.append(item)
                if len(buffer) < SHUFFLE_BUFFER:
                    continue
                data, label = buffer.pop(int(rng.integers(len(buffer))))
                pixels = read_resized(io.BytesIO(data), round(TRAIN_SCALE * s), "a shard image")
                top, left = rng.integers(pixels.shape[0] - s + 1), rng.integers(pixels.shape[1] - s + 1)
                patch = pixels[top:top + s, left:left + s]
                yield to_tensor(patch[:, ::-1] if rng.random() < 0.5 else patch), label


class ShardHeldOut:
    """Centre crops of the held-out shard's first EVAL_LIMIT images (decoded once, when first asked for)."""

    def __init__(self, url: str, image_size: int):
        self.url, self.image_size = url, image_size
        self._arrays: "tuple[np.ndarray, np.ndarray] | None" = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            s, crops, labels = self.image_size, [], []
            for data, label in _samples(self.url):
                pixels = read_resized(io.BytesIO(data), s, f"an image of {self.url}")
                top, left = (pixels.shape[0] - s) // 2, (pixels.shape[1] - s) // 2
                crops.append(pixels[top:top + s, left:left + s])
                labels.append(label)
                if len(crops) == EVAL_LIMIT:
                    break
            if not crops:
                raise ValueError(f"held-out shard {self.url} has no images ({', '.join(IMAGE_KEYS)})")
            self._arrays = np.stack(crops), np.array(labels, dtype=np.int64)
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays()[0])


class ShardData(DataSource):
    """A DataSource (movq_deploy.training.source) over tar shards."""

    split = "shards"

    def __init__(self, spec: str, image_size: int):
        self.source, self.image_size = spec, image_size
        self.urls = expand(spec)
        names = Path(self.urls[0]).parent / "classes.txt"
        self.class_names = names.read_text().split() if names.is_file() else []
        self._eval_set = ShardHeldOut(self.urls[-1], image_size)

    def train_set(self, seed: int = 0, length: "int | None" = None) -> ShardCrops:
        return ShardCrops(self.urls[:-1], self.image_size, seed)

    def eval_set(self) -> ShardHeldOut:
        return self._eval_set

    def sizes(self) -> dict:
        return {"train_shards": len(self.urls) - 1, "eval_crops": len(self._eval_set)}


def shard_batches(dataset: ShardCrops, batch_size: int, rank: int, start_step: int, workers: int,
                  pin_memory: bool):
    """Endless batches of this rank's stream (the counterpart of loader.TrainBatches)."""
    dataset.stream = (start_step, rank)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    while True:
        yield from loader
