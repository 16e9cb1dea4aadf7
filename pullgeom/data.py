"""Datasets: MNIST, Fashion-MNIST (IDX files), the embedded ``mnist-small``, and CelebA.

``load_dataset(name, split, data_dir)`` returns ``(images, labels)``: images float32 in
[0, 1] of shape (n, C, H, W), labels int64 (n,).

- ``mnist`` / ``fashion-mnist``: the four IDX files (``train-images-idx3-ubyte[.gz]`` ...), gz
  or raw, found in ``data_dir`` itself or in torchvision's layout under it (``raw/``,
  ``MNIST/raw/``, ``FashionMNIST/raw/``). When they are missing: torchvision (if it imports)
  or a plain HTTP download fetches them when ``download=True``; otherwise a DataError says
  where to put them.
- ``mnist-small``: the MNIST test split shipped inside the package (pullgeom/assets), split
  deterministically into 8000 training and 2000 test images; works offline anywhere.
- ``celeba``: through torchvision only (center-cropped to 148 and resized to 64 x 64).

``data_dir`` may be None: then the ``PULLGEOM_DATA_DIR`` environment variable is used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DATASETS = ("mnist", "fashion-mnist", "mnist-small", "celeba")
SPLITS = ("train", "test")
ENV_DATA_DIR = "PULLGEOM_DATA_DIR"
ASSETS = Path(__file__).resolve().parent / "assets"
SMALL_TRAIN = 8000  # mnist-small: the first 8000 of a seed-0 permutation of MNIST t10k train, the rest test
SMALL_SEED = 0

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
# IDX type byte -> big-endian numpy dtype (Yann LeCun's format description).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset that cannot be found or read; the message says what to do."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its name ends in .gz) -> array of its stated shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # a cut-off or damaged .gz
        raise DataError(f"{path} is not a readable gzip file ({error}); it is truncated or corrupt, "
                        "re-download it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); re-download it")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">i4"))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path} holds {len(data) - header} bytes of data but its header says {expected}; "
                        "the file is truncated or corrupt, re-download it")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir``, else ``$PULLGEOM_DATA_DIR``, else None."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_DATA_DIR) or None
    return None if data_dir is None else Path(data_dir).expanduser()


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_files(name: str, split: str, data_dir: Path) -> tuple[Path, Path] | None:
    """The (images, labels) IDX paths of a split under ``data_dir`` or torchvision's layout, or None."""
    folders = [data_dir, data_dir / "raw", data_dir / TORCHVISION_FOLDERS[name] / "raw"]
    for folder in folders:
        found = [_find_idx(folder, stem) for stem in IDX_FILES[split]]
        if all(found):
            return found[0], found[1]
    return None


def missing_data_message(name: str, split: str, data_dir: Path | None) -> str:
    """A message that says where the files go and how to get them."""
    images, labels = IDX_FILES[split]
    where = f"'{data_dir}'" if data_dir is not None else f"--data-dir DIR (or ${ENV_DATA_DIR})"
    return (f"{name} {split} split not found: put {images}.gz and {labels}.gz (gz or raw IDX files) in "
            f"{where}, or pass --download to fetch them from {MIRRORS[name]} "
            "(or use --dataset mnist-small, embedded, offline)")


def _download(name: str, data_dir: Path) -> None:
    """Fetch the four IDX .gz files into ``data_dir``: torchvision when it imports, else plain HTTP."""
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        from torchvision import datasets
    except Exception:  # torchvision is optional and may fail to import against this torch build
        datasets = None
    if datasets is not None:
        cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        for train in (True, False):
            cls(str(data_dir), train=train, download=True)
        return
    for split in SPLITS:
        for stem in IDX_FILES[split]:
            target = data_dir / (stem + ".gz")
            if target.exists():
                continue
            partial = target.with_name(target.name + ".part")
            try:
                with urllib.request.urlopen(MIRRORS[name] + stem + ".gz", timeout=60) as response:
                    partial.write_bytes(response.read())
            except OSError as error:
                raise DataError(f"could not download {stem}.gz from {MIRRORS[name]} ({error}); "
                                f"copy the IDX files into '{data_dir}' by hand") from None
            os.replace(partial, target)


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # (n, 1, H, W)
    y = torch.from_numpy(labels.astype(np.int64))
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x.shape[0]} images but {y.shape[0]} labels; the IDX files do not belong together")
    return x, y


def load_idx_dataset(name: str, split: str, data_dir: Path, download: bool = False) -> tuple[Tensor, Tensor]:
    """MNIST or Fashion-MNIST from IDX files: images (n, 1, 28, 28) float32 in [0, 1], labels (n,)."""
    paths = find_idx_files(name, split, data_dir)
    if paths is None and download:
        _download(name, data_dir)
        paths = find_idx_files(name, split, data_dir)
    if paths is None:
        raise DataError(missing_data_message(name, split, data_dir))
    return _to_tensors(read_idx(paths[0]), read_idx(paths[1]))


def load_mnist_small(split: str) -> tuple[Tensor, Tensor]:
    """The embedded MNIST t10k, permuted with seed 0: 8000 train / 2000 test images."""
    images, labels = _to_tensors(read_idx(ASSETS / "t10k-images-idx3-ubyte.gz"),
                                 read_idx(ASSETS / "t10k-labels-idx1-ubyte.gz"))
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SMALL_SEED))
    index = order[:SMALL_TRAIN] if split == "train" else order[SMALL_TRAIN:]
    return images[index], labels[index]


def load_celeba(split: str, data_dir: Path | None, download: bool = False) -> tuple[Tensor, Tensor]:
    """CelebA through torchvision: images (n, 3, 64, 64) in [0, 1], labels zeros (n,)."""
    if data_dir is None:
        raise DataError(f"celeba needs --data-dir DIR (or ${ENV_DATA_DIR}) "
                        "holding torchvision's celeba/ folder")
    try:
        from torchvision import datasets, transforms
    except Exception as error:
        raise DataError(f"celeba is read through torchvision, which does not import here ({error}); "
                        "install a torchvision matching your torch, "
                        "e.g. pip install 'pullgeom[vision]'") from None
    transform = transforms.Compose([transforms.CenterCrop(148), transforms.Resize(64), transforms.ToTensor()])
    try:
        dataset = datasets.CelebA(str(data_dir), split="train" if split == "train" else "test",
                                  transform=transform, download=download)
    except RuntimeError as error:
        raise DataError(f"celeba not found under '{data_dir}' ({error}); put torchvision's celeba/ folder "
                        "there (img_align_celeba/ and list_eval_partition.txt)") from None
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, torch.zeros(images.shape[0], dtype=torch.int64)


def check_dataset_args(name: str, split: str, data_dir: str | os.PathLike | None) -> Path | None:
    """Validate the arguments of ``load_dataset`` without reading anything; returns the data dir."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; pass one of {DATASETS}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; pass one of {SPLITS}")
    resolved = resolve_data_dir(data_dir)
    if name in TORCHVISION_FOLDERS and resolved is None:
        raise DataError(missing_data_message(name, split, None))
    if resolved is not None and resolved.exists() and not resolved.is_dir():
        raise DataError(f"--data-dir '{resolved}' is a file; pass the directory that holds the dataset")
    return resolved


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 limit: int | None = None, download: bool = False) -> tuple[Tensor, Tensor]:
    """Images (n, C, H, W) float32 in [0, 1] and labels (n,) int64; ``limit`` keeps the first n."""
    resolved = check_dataset_args(name, split, data_dir)
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}: pass a positive number of images")
    if name == "mnist-small":
        images, labels = load_mnist_small(split)
    elif name == "celeba":
        images, labels = load_celeba(split, resolved, download)
    else:
        images, labels = load_idx_dataset(name, split, resolved, download)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def file_md5(path: str | os.PathLike) -> str:
    """md5 of a file's uncompressed content (the checksums the data README lists)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    digest = hashlib.md5()
    with opener(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
