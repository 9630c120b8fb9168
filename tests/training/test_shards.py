"""Tar shards through webdataset: crops decoded in the workers, the last shard held out, classes.txt."""
import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from movq_deploy.training.data import load_data
from movq_deploy.training.shards import ShardData, shard_batches

SIZE = 16


def write_shards(folder, shards=3, per_shard=6):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"train-{s:03d}.tar")) as sink:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
                sink.write({"__key__": f"{s}-{i}", "png": buffer.getvalue(), "cls": str(i % 2).encode()})
    (folder / "classes.txt").write_text("even\nodd\n")
    return str(folder) + "/train-{000..%03d}.tar" % (shards - 1)


def test_shards_train_and_held_out(tmp_path, monkeypatch):
    monkeypatch.setattr("movq_deploy.training.shards.SHUFFLE_BUFFER", 4)
    data = load_data(write_shards(tmp_path / "shards"), SIZE)
    assert isinstance(data, ShardData) and data.class_names == ["even", "odd"] and len(data.urls) == 3
    held, labels = data.eval_set().arrays()
    assert held.shape == (6, SIZE, SIZE, 3) and labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert data.summary()["train_shards"] == 2 and data.summary()["eval_crops"] == 6

    batches = shard_batches(data.train_set(seed=0), 4, rank=0, start_step=0, workers=2, pin_memory=False)
    images, labels = next(batches)
    assert images.shape == (4, 3, SIZE, SIZE) and -1 <= images.min() <= images.max() <= 1
    assert set(labels.tolist()) <= {0, 1}
    for _ in range(5):  # endless: more batches than the 12 training images
        next(batches)
    again = next(shard_batches(data.train_set(seed=0), 4, rank=0, start_step=0, workers=0, pin_memory=False))
    other = next(shard_batches(data.train_set(seed=0), 4, rank=1, start_step=0, workers=0, pin_memory=False))
    assert not torch.equal(again[0], other[0])  # each rank its own stream


def test_one_shard_is_a_clear_error(tmp_path):
    pattern = write_shards(tmp_path / "one", shards=1)
    with pytest.raises(ValueError, match="needs at least 2 shards"):
        load_data(pattern, SIZE)
