"""Data: the IDX reader, directory layouts, the embedded mnist-small and clear errors."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from pullgeom.paper.datasets import (
    ASSETS,
    ENV_DATA_DIR,
    DataError,
    file_md5,
    image_files,
    load_dataset,
    read_idx,
    write_blob_images,
)

REAL_MNIST = os.environ.get(ENV_DATA_DIR)


def _write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_split(folder, split, n, compress):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28))
    labels = rng.integers(0, 10, size=(n,))
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if compress else ""
    _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("layout", ["", "raw", "MNIST/raw"])
def test_idx_directory_layouts(tmp_path, compress, layout):
    images, labels = _fake_split(tmp_path / layout, "test", 7, compress)
    x, y = load_dataset("mnist", "test", tmp_path)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0] * 255, torch.from_numpy(images).float())
    assert torch.equal(y, torch.from_numpy(labels))


def test_fashion_uses_its_torchvision_folder_and_limit(tmp_path):
    _fake_split(tmp_path / "FashionMNIST" / "raw", "train", 9, True)
    x, _ = load_dataset("fashion-mnist", "train", tmp_path, limit=4)
    assert x.shape == (4, 1, 28, 28)


def test_env_var_is_used(tmp_path, monkeypatch):
    _fake_split(tmp_path, "train", 3, True)
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path))
    assert load_dataset("mnist", "train")[0].shape[0] == 3


def test_truncated_and_bad_files_are_refused(tmp_path):
    _fake_split(tmp_path, "test", 5, False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


def test_missing_data_message_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*--download"):
        load_dataset("mnist", "test", tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist", "test", None)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar", "test", tmp_path)
    with pytest.raises(DataError, match="split"):
        load_dataset("mnist-small", "validation")


def test_mnist_small_is_a_deterministic_disjoint_split():
    # The embedded files are the real MNIST t10k (md5 of the uncompressed files, data README).
    assert file_md5(ASSETS / "t10k-images-idx3-ubyte.gz") == "2646ac647ad5339dbf082846283269ea"
    assert file_md5(ASSETS / "t10k-labels-idx1-ubyte.gz") == "27ae3e4e09519cfbb04c329615203637"
    train, train_labels = load_dataset("mnist-small", "train")
    test, _ = load_dataset("mnist-small", "test")
    assert train.shape == (8000, 1, 28, 28) and test.shape == (2000, 1, 28, 28)
    assert 0.0 <= float(train.min()) and float(train.max()) <= 1.0
    assert torch.equal(load_dataset("mnist-small", "train", limit=5)[0], train[:5])
    # disjoint: no test image equals a training image's exact pixels (MNIST t10k has no duplicates here)
    train_keys = {hash(row.numpy().tobytes()) for row in train.reshape(8000, -1)[:2000]}
    assert not any(hash(row.numpy().tobytes()) in train_keys for row in test.reshape(2000, -1))
    assert set(train_labels.tolist()) == set(range(10))


@pytest.mark.skipif(not REAL_MNIST, reason=f"set {ENV_DATA_DIR} to the real MNIST folder")
def test_real_mnist_shapes():
    x, y = load_dataset("mnist", "test", REAL_MNIST)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)


# ----------------------------------------------------------------------------------------
# celeba: a folder of real JPEG files written with PIL.


@pytest.mark.parametrize("layout", ["", "img_align_celeba", "celeba/img_align_celeba"])
def test_celeba_folder_layouts_split_nine_to_one(tmp_path, layout):
    write_blob_images(tmp_path / layout, 23, size=(178, 218))  # CelebA's aligned-face size
    train, labels = load_dataset("celeba", "train", tmp_path)
    test, _ = load_dataset("celeba", "test", tmp_path)
    assert train.shape == (20, 3, 64, 64) and test.shape == (3, 3, 64, 64)  # ceil(23 / 10) test images
    assert train.dtype == torch.float32 and 0.0 <= float(train.min()) and float(train.max()) <= 1.0
    assert torch.equal(labels, torch.zeros(20, dtype=torch.int64))
    train_names = [p.name for p in image_files(tmp_path, "train")]
    test_names = [p.name for p in image_files(tmp_path, "test")]
    assert sorted(train_names + test_names) == [f"{i:06d}.jpg" for i in range(23)]  # disjoint, complete
    assert train_names == sorted(train_names)  # row i is the i-th file of the split, by name
    assert test_names == [p.name for p in image_files(tmp_path, "test")]  # deterministic
    assert torch.equal(load_dataset("celeba", "train", tmp_path, limit=4)[0], train[:4])


def test_celeba_center_crop_and_resize(tmp_path):
    from PIL import Image

    # 178 x 218 (CelebA's aligned size): the central 148 x 148 square is the crop. Red from 3 pixels
    # outside it (the antialiasing filter reaches ~2.3 source pixels past the box), blue elsewhere:
    # the 64 x 64 result is pure red. Lossless png, so the values are exact.
    pixels = np.zeros((218, 178, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    top, left = (218 - 148) // 2, (178 - 148) // 2
    pixels[top - 3:top + 151, left - 3:left + 151] = (255, 0, 0)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    # An image that is already 64 x 64 is used as it is.
    small = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "b.png")
    images = torch.cat([load_dataset("celeba", split, tmp_path)[0] for split in ("train", "test")])
    by_content = sorted(images, key=lambda x: float(x[2].mean()))  # the red one has no blue
    red, copied = by_content
    assert torch.equal(red[0], torch.ones(64, 64)) and not red[1:].any()
    assert torch.equal(copied, torch.from_numpy(small).permute(2, 0, 1).float() / 255)


def test_celeba_official_partition_file(tmp_path):
    write_blob_images(tmp_path / "celeba" / "img_align_celeba", 6)
    codes = [0, 0, 1, 2, 0, 2]  # train, train, validation, test, train, test
    lines = [f"{i:06d}.jpg {code}" for i, code in enumerate(codes)] + ["999999.jpg 0"]  # not on disk: skipped
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    assert [p.name for p in image_files(tmp_path, "train")] == ["000000.jpg", "000001.jpg", "000004.jpg"]
    assert [p.name for p in image_files(tmp_path, "test")] == ["000003.jpg", "000005.jpg"]
    assert load_dataset("celeba", "test", tmp_path)[0].shape == (2, 3, 64, 64)
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000000.jpg train\n")
    with pytest.raises(DataError, match="line 1"):
        image_files(tmp_path, "train")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000000.jpg 0\n")
    with pytest.raises(DataError, match="none of the 6 images.*test partition"):
        image_files(tmp_path, "test")


def test_celeba_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    with pytest.raises(DataError, match="celeba needs --data-dir"):
        load_dataset("celeba", "train", None)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("celeba", "train", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jpg/.jpeg/.png images.*img_align_celeba"):
        load_dataset("celeba", "train", tmp_path / "empty")
    write_blob_images(tmp_path / "one", 1)
    with pytest.raises(DataError, match="only 1 image; put at least 2"):
        load_dataset("celeba", "test", tmp_path / "one")
    with pytest.raises(DataError, match="cannot be downloaded"):
        load_dataset("celeba", "train", tmp_path / "one", download=True)
    write_blob_images(tmp_path / "bad", 12)
    for name in ("000000.jpg", "000001.jpg", "000002.jpg"):  # 3 > 2 test images: one is a training image
        (tmp_path / "bad" / name).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read the image .*remove or replace it"):
        load_dataset("celeba", "train", tmp_path / "bad")
