"""Data: the IDX reader, directory layouts, the embedded mnist-small and clear errors."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from pullgeom.data import (
    ASSETS,
    ENV_DATA_DIR,
    DataError,
    file_md5,
    load_dataset,
    read_idx,
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
