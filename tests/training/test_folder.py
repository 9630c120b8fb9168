"""A folder of images: cached file index (reused until the folder changes), lazy decoding, held-out split."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from movq_deploy.training.data import folder_data
from movq_deploy.training.folder import FolderData, load_index, read_resized, scan_folder

SIZE = 32


def make_folder(root, classes, per_class, size=(48, 40), ext="png"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{i:02d}.{ext}")
    return root


def test_index_is_cached_until_the_folder_changes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", ["cats", "dogs"], 6)
    cache = tmp_path / "cache"
    first = load_index(root, cache)
    assert first.class_names == ["cats", "dogs"] and len(first.files) == 12 and first.labels[:6] == [0] * 6
    assert len(list(cache.glob("index-*.json"))) == 1

    scans = []
    monkeypatch.setattr("movq_deploy.training.folder.scan_folder", lambda r: scans.append(r) or scan_folder(r))
    assert load_index(root, cache) == first and not scans  # unchanged folder: read from the cache, no walk
    Image.new("RGB", (48, 40)).save(root / "dogs" / "99.png")
    os.utime(root / "dogs", ns=(1, 1))  # a new file changes its directory's mtime; make sure of it on coarse clocks
    changed = load_index(root, cache)
    assert len(scans) == 1 and "dogs/99.png" in changed.files and len(changed.files) == 13
    (cache / next(cache.glob("index-*.json")).name).write_text("{not json")
    assert load_index(root, cache).files == changed.files and len(scans) == 2  # a broken cache is rescanned


def test_index_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_index(tmp_path / "missing", tmp_path / "cache")
    mixed = make_folder(tmp_path / "mixed", ["a"], 2)
    make_folder(mixed, [""], 1)
    with pytest.raises(ValueError, match="mixes images at its top level"):
        load_index(mixed, tmp_path / "cache")


def test_lazy_folder_data(tmp_path):
    root = make_folder(tmp_path / "d", ["cats", "dogs"], 6)
    data = folder_data(root, SIZE, index_cache=tmp_path / "cache")
    assert isinstance(data, FolderData) and data.split == "images" and data.class_names == ["cats", "dogs"]
    train_names = {f for f, _ in data.train_files}
    eval_names = {f for f, _ in data.eval_files}
    assert not train_names & eval_names and len(train_names) == 10 and eval_names == {"cats/05.png", "dogs/05.png"}
    assert data.summary()["train_pictures"] == 10 and data.summary()["eval_crops"] == 2

    train = data.train_set(seed=3)
    assert len(train) == 10
    x, y = train[4]
    assert x.shape == (3, SIZE, SIZE) and -1 <= x.min() <= x.max() <= 1 and y == train.labels[4]
    assert torch.equal(train[4][0], x) and torch.equal(data.train_set(seed=3)[4][0], x)  # f(seed, index)
    assert train[14][1] == y and not torch.equal(train[14][0], x)  # index 14 = image 4 again, a fresh crop
    images, labels = train.batch([0, 1, 2])
    assert images.shape == (3, 3, SIZE, SIZE) and labels.dtype == torch.int64

    held, held_labels = data.eval_set().arrays()  # centre crop of the image resized to shorter side SIZE
    expected = read_resized(root / "cats" / "05.png", SIZE)
    top, left = (expected.shape[0] - SIZE) // 2, (expected.shape[1] - SIZE) // 2
    assert np.array_equal(held[0], expected[top:top + SIZE, left:left + SIZE]) and held_labels.tolist() == [0, 1]


def test_jpeg_draft_decoding_keeps_the_target_size(tmp_path):
    path = tmp_path / "big.jpg"
    gradient = np.linspace(0, 255, 800 * 600 * 3).reshape(600, 800, 3).astype(np.uint8)
    Image.fromarray(gradient).save(path, quality=95)
    small = read_resized(path, 70)  # decoded at 1/8 (75 x 100), then resized to shorter side 70
    assert small.shape == (70, 93, 3)
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB").resize((93, 70), Image.BICUBIC), dtype=np.int16)
    assert np.abs(small.astype(np.int16) - full).mean() < 3  # same picture


def test_unreadable_image_is_one_line(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"], 6)
    (root / "a" / "00.png").write_bytes(b"not a png")
    data = folder_data(root, SIZE, index_cache=tmp_path / "cache")  # nothing is decoded at start
    with pytest.raises(ValueError, match="cannot read image .*00.png"):
        data.train_set()[0]
