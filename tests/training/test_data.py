"""Training data: the embedded photographs, folders of images, and a held-out split that shares no pixel."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from movq_deploy.training.data import EMBEDDED_PHOTOS, embedded_data, folder_data, load_data, to_tensor, to_uint8

SIZE = 32


@pytest.fixture(scope="module")
def embedded():
    return embedded_data(SIZE)


def test_embedded_photos_are_the_classes(embedded):
    assert embedded.class_names == list(EMBEDDED_PHOTOS) and embedded.split == "strip"
    images, labels = embedded.eval_set().arrays()
    assert images.shape[1:] == (SIZE, SIZE, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(len(EMBEDDED_PHOTOS)))  # every photo contributes held-out crops
    assert images.std() > 20  # real content, not blank


def test_train_crops_are_a_function_of_the_index(embedded):
    train = embedded.train_set(seed=3)
    x, y = train[5]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    assert torch.equal(train[5][0], x) and train[5][1] == y
    assert not torch.equal(train[6][0], x)
    assert not torch.equal(embedded.train_set(seed=4)[5][0], x)
    batch, labels = train.batch(range(4))
    assert batch.shape == (4, 3, SIZE, SIZE) and torch.equal(batch[0], train[0][0]) and labels.dtype == torch.int64
    loader = DataLoader(train, batch_size=4)  # a plain Dataset for DataLoader
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, SIZE, SIZE) and labels.shape == (4,)


def test_uint8_tensor_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8(to_tensor(images)), images)


def test_strip_split_shares_no_pixel():
    embedded = embedded_data(SIZE)  # its own copy: the pixels are overwritten below
    # Paint every pixel with (column, picture) so a crop tells where it came from.
    for pid, pic in enumerate(embedded.train_pictures):
        h, w, _ = pic.pixels.shape
        cols = np.broadcast_to(np.arange(w), (h, w))
        pic.pixels = np.stack([cols % 256, cols // 256, np.full((h, w), pid)], -1).astype(np.uint8)
    eval_cols = {}
    for image, _ in (embedded.eval_set().crop(i) for i in range(len(embedded.eval_set()))):
        pid = int(image[0, 0, 2])
        cols = image[..., 0].astype(int) + 256 * image[..., 1].astype(int)
        eval_cols.setdefault(pid, set()).update(cols.ravel().tolist())
    train = embedded.train_set(seed=0)
    flipped = 0
    for i in range(400):
        image, _ = train.crop(i)
        cols = image[0, :, 0].astype(int) + 256 * image[0, :, 1].astype(int)
        flipped += cols[0] > cols[-1]
        assert not set(cols.tolist()) & eval_cols[int(image[0, 0, 2])]
    assert 100 < flipped < 300  # horizontal flips happen about half the time


def make_folder(root, classes, per_class, size=(48, 40)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i:02d}.png")
    return root


def test_folder_classes_and_held_out_images(tmp_path):
    data = folder_data(make_folder(tmp_path / "d", ["cats", "dogs"], 6), SIZE)
    assert data.class_names == ["cats", "dogs"] and data.split == "images"
    train_names = {name for name, _ in data.train_files}  # read lazily (folder.FolderData)
    eval_names = {name for name, _ in data.eval_files}
    assert not train_names & eval_names and {label for _, label in data.eval_files} == {0, 1}
    assert len(data.eval_set()) == 2 and len(train_names) == 10
    assert data.train_set()[0][0].shape == (3, SIZE, SIZE)


def test_folder_without_subfolders_is_unconditional_strip(tmp_path):
    data = load_data(make_folder(tmp_path / "flat", [""], 3), SIZE)
    assert data.class_names == [] and data.split == "strip" and len(data.eval_set()) == 18


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        folder_data(tmp_path / "missing", SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        folder_data(tmp_path / "empty", SIZE)
    mixed = make_folder(tmp_path / "mixed", ["a"], 2)
    make_folder(mixed, [""], 1)
    with pytest.raises(ValueError, match="mixes"):
        folder_data(mixed, SIZE)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        folder_data(tmp_path / "broken", SIZE)
