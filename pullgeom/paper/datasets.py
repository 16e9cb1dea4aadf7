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
- ``celeba``: a directory of face images (``.jpg``, ``.jpeg``, ``.png``, any size), read with
  Pillow (no torchvision): ``data_dir`` itself, or its ``img_align_celeba/`` or
  ``celeba/img_align_celeba/`` (CelebA's and torchvision's layouts). Each image becomes
  (3, 64, 64) as in the paper's CelebA preprocessing: the central square of side 148/178 of
  the shorter side (CelebA's aligned 178 x 218 faces: the usual 148 x 148 center crop) resized
  bilinearly (antialiased) to 64 x 64; images already 64 x 64 are taken as preprocessed and used
  as they are. Split: CelebA's ``list_eval_partition.txt`` when it lies beside the images (in
  their folder or its parent): partition 0 is train (162,770 images), 2 test (19,962), 1 unused,
  as torchvision's ``CelebA(split=...)``. Without it (any plain folder of images): the sorted
  file names are permuted with seed 0 and the first ceil(n / 10) are the test split, the rest
  train; adding files reshuffles that split. Within a split images keep name order
  (``image_files`` lists them, so row i of a score file is its i-th file).

``data_dir`` may be None: then the ``PULLGEOM_DATA_DIR`` environment variable is used.

``DATASETS`` is the one table of the datasets the pipeline knows: how each is read and checked,
its image shape, the VAE ``train`` and ``reproduce`` build for it and its ``reproduce`` profiles.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pullgeom.paper.models import ARCHITECTURES, Architecture
from pullgeom.paper.profiles import CELEBA_PROFILES, MLP_PROFILES, Profile

SPLITS = ("train", "test")
ENV_DATA_DIR = "PULLGEOM_DATA_DIR"
ASSETS = Path(__file__).resolve().parent / "assets"
SMALL_TRAIN = 8000  # mnist-small: the first 8000 of a seed-0 permutation of MNIST t10k train, the rest test
SMALL_SEED = 0

MNIST_IMAGE_SHAPE = (1, 28, 28)  # MNIST, Fashion-MNIST and mnist-small
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_SUBFOLDERS = ("img_align_celeba", "celeba/img_align_celeba")  # CelebA's and torchvision's layouts
IMAGE_SIDE = 64
CELEBA_CROP_FRACTION = 148 / 178  # the 148 x 148 center crop of CelebA's 178-wide aligned faces
IMAGES_PER_TEST_IMAGE = 10  # 1 in 10 images is a test image (CelebA's own test split: 9.9 %)
IMAGE_SPLIT_SEED = 0
PARTITION_FILE = "list_eval_partition.txt"  # CelebA's official split: 0 train, 1 validation, 2 test
PARTITION_CODES = {"train": 0, "test": 2}
PROGRESS_MIN_IMAGES = 2000  # a progress bar for reads that take more than a second or two
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


def check_idx_files(name: str, split: str, data_dir: Path | None, download: bool = False) -> None:
    """Raise DataError, saying where the files go, when a split's IDX files are not under
    ``data_dir`` and will not be downloaded (``download``); reads nothing."""
    if data_dir is None or (not download and find_idx_files(name, split, data_dir) is None):
        raise DataError(missing_data_message(name, split, data_dir))


def load_idx_dataset(name: str, split: str, data_dir: Path | None,
                     download: bool = False) -> tuple[Tensor, Tensor]:
    """MNIST or Fashion-MNIST from IDX files: images (n, 1, 28, 28) float32 in [0, 1], labels (n,)."""
    if data_dir is None:
        raise DataError(missing_data_message(name, split, None))
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


def find_image_folder(data_dir: Path) -> tuple[Path, list[str]]:
    """The folder of face images under ``data_dir`` and its image file names, sorted.

    Looks in ``data_dir``, ``data_dir/img_align_celeba`` and ``data_dir/celeba/img_align_celeba``
    (not deeper); raises DataError, saying where to put the images, when none has any.
    """
    if not data_dir.is_dir():
        raise DataError(f"--data-dir '{data_dir}' does not exist; pass the folder of face images "
                        "(e.g. CelebA's img_align_celeba)")
    for folder in (data_dir, *(data_dir / sub for sub in IMAGE_SUBFOLDERS)):
        if folder.is_dir():
            names = sorted(entry.name for entry in os.scandir(folder)
                           if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES)
            if names:
                return folder, names
    raise DataError(f"no {'/'.join(IMAGE_SUFFIXES)} images in '{data_dir}' (nor in its "
                    f"{' or '.join(IMAGE_SUBFOLDERS)}): put the face images there, e.g. CelebA's "
                    "img_align_celeba/*.jpg from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html")


def read_partition(path: Path) -> dict[str, int]:
    """CelebA's ``list_eval_partition.txt``: one ``<file name> <0|1|2>`` line per image
    (0 train, 1 validation, 2 test) -> {file name: partition}."""
    partition = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"'{path}' line {number} is {line!r}, not '<image file> <0|1|2>'; "
                            "restore CelebA's list_eval_partition.txt or remove it (then 1 in 10 "
                            "images is drawn as a test image)")
        partition[fields[0]] = int(fields[1])
    return partition


def image_files(data_dir: Path, split: str) -> list[Path]:
    """The image files of a split of an image folder (``celeba``), in the order they are loaded.

    With a ``list_eval_partition.txt`` beside the images (in their folder or its parent, CelebA's
    and torchvision's layouts): its partition 0 is the training split and 2 the test split (1,
    validation, is unused), as torchvision's ``CelebA(split=...)``. Without one: a seed-0
    permutation of the sorted names, its first ceil(n / 10) the test split, the rest the training
    split. Either way each split is returned in name order and is deterministic.
    """
    folder, names = find_image_folder(data_dir)
    for candidate in (folder / PARTITION_FILE, folder.parent / PARTITION_FILE):
        if candidate.is_file():
            partition = read_partition(candidate)
            wanted = PARTITION_CODES[split]
            chosen = [name for name in names if partition.get(name) == wanted]
            if not chosen:
                raise DataError(f"none of the {len(names)} images in '{folder}' is in the {split} "
                                f"partition ({wanted}) of '{candidate}'; add the {split} images, or "
                                f"remove {PARTITION_FILE} to split the folder 9:1 instead")
            return [folder / name for name in chosen]
    if len(names) < 2:
        raise DataError(f"'{folder}' holds only {len(names)} image; put at least 2 there "
                        "(one for each of the train and test splits)")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(IMAGE_SPLIT_SEED))
    n_test = -(-len(names) // IMAGES_PER_TEST_IMAGE)  # ceil(n / 10)
    chosen_index = order[:n_test] if split == "test" else order[n_test:]
    return [folder / names[i] for i in sorted(chosen_index.tolist())]


def read_face_image(path: Path) -> np.ndarray:
    """One image as (64, 64, 3) uint8: center crop (148/178 of the shorter side) and bilinear resize.

    64 x 64 images are returned as they are (taken as already preprocessed).
    """
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading celeba images needs Pillow: pip install 'pullgeom[celeba]' "
                        "(or pillow)") from None
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read the image '{path}' ({error}); remove or replace it") from None
    side = IMAGE_SIDE
    if image.size != (side, side):
        width, height = image.size
        crop = min(width, height) * CELEBA_CROP_FRACTION
        box = ((width - crop) / 2, (height - crop) / 2, (width + crop) / 2, (height + crop) / 2)
        # PIL's bilinear resize widens its filter when shrinking, so it antialiases like
        # torchvision's Resize(antialias=True).
        image = image.resize((side, side), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image, dtype=np.uint8)


def celeba_files(split: str, data_dir: Path | None, download: bool = False) -> list[Path]:
    """``image_files`` of a split, after checking that the arguments can name a face folder at all:
    a ``data_dir`` is given, and no ``download`` (CelebA is not downloadable here)."""
    if download:
        raise DataError("celeba cannot be downloaded by pullgeom; put the face images (e.g. CelebA's "
                        "img_align_celeba/*.jpg) in --data-dir DIR and drop --download")
    if data_dir is None:
        raise DataError(f"celeba needs --data-dir DIR (or ${ENV_DATA_DIR}): a folder of .jpg/.png "
                        "face images, e.g. CelebA's img_align_celeba")
    return image_files(data_dir, split)


def load_celeba(split: str, data_dir: Path | None, limit: int | None = None,
                download: bool = False) -> tuple[Tensor, Tensor]:
    """Face images (module docstring): images (n, 3, 64, 64) float32 in [0, 1], labels zeros (n,).

    ``limit`` reads only the first ``limit`` files of the split. Files are decoded on a thread
    pool (Pillow releases the GIL while decoding and resizing).
    """
    files = celeba_files(split, data_dir, download)[:limit]
    pixels = np.empty((len(files), IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = pool.map(read_face_image, files)
        for index, image in enumerate(tqdm(decoded, total=len(files), desc=f"reading celeba {split}",
                                           leave=False, disable=len(files) < PROGRESS_MIN_IMAGES)):
            pixels[index] = image
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return images, torch.zeros(images.shape[0], dtype=torch.int64)


def write_blob_images(folder: str | os.PathLike, count: int, size: tuple[int, int] = (64, 64),
                      seed: int = 0, suffix: str = ".jpg") -> list[Path]:
    """``count`` images of smooth random colour blobs, ``size`` = (width, height), saved as
    ``suffix`` (.jpg or .png): a stand-in for face images where CelebA is not at hand (smoke
    runs, tests). Deterministic in ``seed``; named 000000.jpg, 000001.jpg, ... like CelebA's."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    paths = []
    for index in range(count):
        cy, cx = rng.uniform(-0.6, 0.6, size=2)
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / rng.uniform(0.2, 0.5) ** 2)
        image = np.clip(0.15 + 0.8 * rng.uniform(size=3) * blob[..., None], 0, 1)  # (height, width, 3)
        paths.append(folder / f"{index:06d}{suffix}")
        Image.fromarray((image * 255).astype(np.uint8)).save(paths[-1])
    return paths


# ----------------------------------------------------------------------------------------
# The table of datasets.


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset the pipeline runs on: how it is read, and what ``train`` / ``reproduce`` make of it."""

    name: str
    # (split, data_dir, limit, download) -> images (n, *image_shape) float32 in [0, 1], labels (n,)
    # int64; it may stop after the first ``limit`` images (``load_dataset`` keeps only those).
    read: Callable[[str, Path | None, int | None, bool], tuple[Tensor, Tensor]]
    # (split, data_dir, download): raises DataError, saying what to do, when the split cannot be
    # read; lists files at most, so a command checks its options before any work starts.
    check_files: Callable[[str, Path | None, bool], None]
    image_shape: tuple[int, ...]
    architecture: Architecture  # the VAE trained on it
    profiles: dict[str, Profile]  # reproduce's --profile choices
    model_options: tuple[str, ...] = ()  # the SweepConfig fields its command line may set
    # Whether the authors' published MNIST scores (``pullgeom.paper.report.AUTHORS_SCORES``) are of
    # models of these images, so that ``reproduce`` lays its numbers beside them.
    authors_reference: bool = False


def _idx_reader(name: str) -> Callable[[str, Path | None, int | None, bool], tuple[Tensor, Tensor]]:
    """``DatasetSpec.read`` of an IDX dataset: it reads whole files, ``load_dataset`` applies the limit."""
    return lambda split, data_dir, limit, download: load_idx_dataset(name, split, data_dir, download)


def _idx_checker(name: str) -> Callable[[str, Path | None, bool], None]:
    return lambda split, data_dir, download: check_idx_files(name, split, data_dir, download)


DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec(name="mnist", read=_idx_reader("mnist"), check_files=_idx_checker("mnist"),
                    image_shape=MNIST_IMAGE_SHAPE, architecture=ARCHITECTURES["paper-mlp"],
                    profiles=MLP_PROFILES, authors_reference=True),
        DatasetSpec(name="fashion-mnist", read=_idx_reader("fashion-mnist"),
                    check_files=_idx_checker("fashion-mnist"), image_shape=MNIST_IMAGE_SHAPE,
                    architecture=ARCHITECTURES["paper-mlp"], profiles=MLP_PROFILES),
        DatasetSpec(name="mnist-small", read=lambda split, data_dir, limit, download: load_mnist_small(split),
                    check_files=lambda split, data_dir, download: None,  # embedded: always there
                    image_shape=MNIST_IMAGE_SHAPE, architecture=ARCHITECTURES["paper-mlp"],
                    profiles=MLP_PROFILES, authors_reference=True),  # MNIST test-set images
        DatasetSpec(name="celeba", read=load_celeba,
                    check_files=lambda split, data_dir, download: celeba_files(split, data_dir, download),
                    image_shape=(3, IMAGE_SIDE, IMAGE_SIDE), architecture=ARCHITECTURES["celeba-conv"],
                    profiles=CELEBA_PROFILES, model_options=("channels", "latent_dim")),
    )
}


def dataset_spec(name: str) -> DatasetSpec:
    """The ``DATASETS`` entry of ``name``; a DataError naming the choices when there is none."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; pass one of {tuple(DATASETS)}")
    return DATASETS[name]


def check_dataset_args(name: str, split: str, data_dir: str | os.PathLike | None) -> Path | None:
    """Validate the arguments of ``load_dataset`` without reading anything; returns the data dir."""
    dataset_spec(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; pass one of {SPLITS}")
    resolved = resolve_data_dir(data_dir)
    if resolved is not None and resolved.exists() and not resolved.is_dir():
        raise DataError(f"--data-dir '{resolved}' is a file; pass the directory that holds the dataset")
    return resolved


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 limit: int | None = None, download: bool = False) -> tuple[Tensor, Tensor]:
    """Images (n, C, H, W) float32 in [0, 1] and labels (n,) int64; ``limit`` keeps the first n."""
    resolved = check_dataset_args(name, split, data_dir)
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit}: pass a positive number of images")
    images, labels = dataset_spec(name).read(split, resolved, limit, download)
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
