"""CIFAR-10 as in-memory uint8 tensors, and the batch transforms that train and eval apply to them.

The data lives in ``DIR/cifar-10-batches-py/`` (the python-pickle layout of the official archive), where ``DIR`` is
``--data``, else the environment variable ``CKPT_EMA_DATA``, else ``~/.cache/ckpt-ema/cifar10``. When the batches
are missing, torchvision downloads and unpacks the official archive there; either way the pickles are then read
here, not by ``torchvision.datasets.CIFAR10``, which insists on the official md5s and so refuses re-built copies.
The integrity check is what holds for any faithful copy: 10,000 images of 3 x 32 x 32 bytes per batch, labels 0-9.

On 2 CPU cores a DataLoader with per-image PIL transforms would cost more than the small models themselves, so the
whole split is one tensor, a batch is an index into it, and augmentation (random crop with 4 pixels of zero
padding, horizontal flip) runs on the whole batch at once, with its randomness drawn from a ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckpt_ema.errors import CkptEmaError

DATA_ENV = "CKPT_EMA_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/ckpt-ema/cifar10")
BATCHES_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
IMAGES_PER_FILE = 10_000
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The seed's normalisation, transforms.Normalize((0.5,) * 3, (0.5,) * 3) after ToTensor: pixels map to [-1, 1].
MEAN = 0.5
STD = 0.5
CROP_PADDING = 4


@dataclass
class Split:
    """Images (uint8, N x 3 x 32 x 32, NCHW as stored) and their labels (int64, N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, indices: torch.Tensor) -> Split:
        # index_select copies whole rows; plain [] indexing goes element by element, ~10x slower for a batch
        return Split(self.images.index_select(0, indices), self.labels.index_select(0, indices))

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


# ---------------------------------------------------------------------------------------------------- finding


def resolve_data_dir(data: str | Path | None = None) -> Path:
    """The data folder: ``data`` if given, else ``$CKPT_EMA_DATA``, else ``~/.cache/ckpt-ema/cifar10``."""
    chosen = data if data is not None else os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def describe_data_dir(data: str | Path | None = None) -> str:
    """Where the data folder came from, for error messages: the user may not know which setting won."""
    if data is not None:
        return "given by --data"
    if os.environ.get(DATA_ENV):
        return f"from ${DATA_ENV}"
    return f"the default; choose another with --data or ${DATA_ENV}"


def has_batches(root: Path) -> bool:
    """Whether ``root/cifar-10-batches-py/`` holds all six batch files."""
    folder = root / BATCHES_FOLDER
    return all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES)


def download_cifar10(root: Path) -> None:
    """Download and unpack the official archive into ``root``, atomically: a failed download leaves nothing behind.

    torchvision does the downloading and checks the archive's md5 (the official archive's, which is right for a
    download); it unpacks into a temporary folder beside the target, which is then renamed into place.
    """
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        download_and_extract_archive(
            CIFAR10.url, download_root=str(staging), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
        )
        os.replace(staging / BATCHES_FOLDER, root / BATCHES_FOLDER)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_cifar10(data: str | Path | None = None, download: bool = True) -> Path:
    """The folder holding ``cifar-10-batches-py/``, downloading the data set into it first when it is missing."""
    root = resolve_data_dir(data)
    if has_batches(root):
        return root
    where = f"{root / BATCHES_FOLDER} ({describe_data_dir(data)})"
    if not download:
        raise CkptEmaError(f"CIFAR-10 not found in {where}")
    existed = root.exists()
    try:
        download_cifar10(root)
    except Exception as exc:  # no network, a proxy error, a bad archive, a read-only folder: all end the same way
        if not existed and root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # leave no empty folder behind a failed download
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CkptEmaError(
            f"CIFAR-10 not found in {where} and the download failed ({reason}); "
            f"put the python batches there or point --data / ${DATA_ENV} at a folder that has them"
        ) from None
    return root


# ---------------------------------------------------------------------------------------------------- reading


def read_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch as (uint8 images N x 3 x 32 x 32, int64 labels N), checked for shape and label range.

    The pickle is the data set's documented format (a dict of numpy arrays and lists); it is a data file that
    the user chose, not a checkpoint, so plain ``pickle`` is the right reader.
    """
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise CkptEmaError(f"not a CIFAR-10 batch file: {exc}", path) from None
    if images.dtype != np.uint8 or images.shape != (IMAGES_PER_FILE, 3 * 32 * 32):
        raise CkptEmaError(
            f"expected {IMAGES_PER_FILE} uint8 images of 3072 bytes, found {images.dtype} {images.shape}", path
        )
    if labels.shape != (IMAGES_PER_FILE,) or labels.min() < 0 or labels.max() >= len(CLASSES):
        raise CkptEmaError(
            f"expected {IMAGES_PER_FILE} labels in 0..9, found {labels.shape[0]} in {labels.min()}..{labels.max()}",
            path,
        )
    return images.reshape(-1, 3, 32, 32), labels


def read_split(root: Path, files: tuple[str, ...], limit: int | None = None) -> Split:
    """The first ``limit`` images (all when None) of the batch files, in order; reads only the files it needs."""
    if limit is not None and not 0 < limit <= len(files) * IMAGES_PER_FILE:
        raise CkptEmaError(f"subset size must be in 1..{len(files) * IMAGES_PER_FILE}, got {limit}")
    wanted = len(files) * IMAGES_PER_FILE if limit is None else limit
    images, labels = [], []
    for name in files[: -(-wanted // IMAGES_PER_FILE)]:  # ceil: the files that hold the first `wanted` images
        batch_images, batch_labels = read_batch_file(root / BATCHES_FOLDER / name)
        images.append(batch_images)
        labels.append(batch_labels)
    x = torch.from_numpy(np.concatenate(images)[:wanted].copy())
    y = torch.from_numpy(np.concatenate(labels)[:wanted].copy())
    return Split(x, y)


def load_cifar10(
    data: str | Path | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    splits: tuple[str, ...] = ("train", "test"),
    download: bool = True,
) -> dict[str, Split]:
    """CIFAR-10's requested splits ("train", "test") as in-memory tensors: the first N images of each when given."""
    root = ensure_cifar10(data, download=download)
    out = {}
    if "train" in splits:
        out["train"] = read_split(root, TRAIN_FILES, train_subset)
    if "test" in splits:
        out["test"] = read_split(root, TEST_FILES, test_subset)
    return out


# ---------------------------------------------------------------------------------------------------- seeds, val split


def seeded_generator(seed: int, *stream: object) -> torch.Generator:
    """A CPU generator for one named stream of randomness (``seeded_generator(seed, "order", epoch)``).

    Streams are independent of each other and of how many numbers other streams drew, which is what makes a
    resumed run draw exactly what the uninterrupted run drew.
    """
    digest = hashlib.sha256("/".join(map(str, (seed, *stream))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def validation_indices(n_train: int, val_split: int, seed: int) -> list[int]:
    """The ``val_split`` training indices (sorted) kept out of training: a seeded draw, so eval can redo it."""
    if not 0 <= val_split < n_train:
        raise CkptEmaError(
            f"--val-split must be in 0..{n_train - 1} (there are {n_train} training images), got {val_split}"
        )
    chosen = torch.randperm(n_train, generator=seeded_generator(seed, "val"))[:val_split]
    return sorted(chosen.tolist())


def split_validation(train: Split, val_indices: list[int]) -> tuple[Split, Split]:
    """(what training uses, the held-out validation images), given the held-out indices."""
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[torch.tensor(val_indices, dtype=torch.long)] = False
    return train.subset(keep.nonzero().squeeze(1)), train.subset(torch.tensor(val_indices, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- transforms


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32, as ToTensor + Normalize((0.5,) * 3, (0.5,) * 3) would (the seed's transform).

    One conversion and two in-place passes: on 2 cores the three out-of-place passes of the textbook formula
    cost as much as the small model's forward pass at eval.
    """
    return images.float().mul_(1.0 / (255.0 * STD)).sub_(MEAN / STD)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32 x 32 crop of the zero-padded image and a horizontal flip with probability 1/2, per image.

    Same distribution as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip() on uint8 images. The
    random numbers come from ``generator`` (CPU) so a batch's augmentation does not depend on the device. The
    whole batch is one ``gather`` from the padded images: each output pixel reads one padded pixel, at
    (dy + row, dx + col), or (dy + row, dx + 31 - col) when flipped.
    """
    n, c, h, w = images.shape
    pad = CROP_PADDING
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)).reshape(n, c, -1)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)  # n x h: the padded row each output row reads
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    source = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(n, 1, h * w).to(images.device)
    return padded.gather(2, source.expand(n, c, h * w)).reshape(n, c, h, w)


def training_batch(
    split: Split, indices: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised (and, given a generator, augmented) images at ``indices`` and their labels."""
    images = split.images.index_select(0, indices)
    if generator is not None:
        images = augment(images, generator)
    return normalize(images), split.labels.index_select(0, indices)
