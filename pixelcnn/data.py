"""Image data as exact integer levels.

Every dataset is held in memory as ``uint8`` images ``[N, C, H, W]`` (MNIST is 47 MB) plus
``int64`` labels. Training targets are those integers themselves, never reconstructed from floats
(``ceil(x * 255)`` maps 0 -> 0 but also shifts every other value; truncation after float maths
turns 255 * (k / 255) into k - 1 for some k). The model input is derived from the integers:
``levels_to_input``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass

import numpy as np
import torch

from ._torchvision import import_torchvision

DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")
# (channels, height, width, classes) of each dataset, known without loading it.
DATASET_SHAPES = {
    "mnist": (1, 28, 28, 10),
    "fashion_mnist": (1, 28, 28, 10),
    "cifar10": (3, 32, 32, 10),
    "synthetic": (1, 12, 12, 2),
}


class DataError(ValueError):
    """A dataset that cannot be loaded; the message is one line naming the problem."""


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, C, H, W], integer levels
    labels: torch.Tensor  # int64 [N]
    num_classes: int

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        return tuple(self.images.shape[1:])


def levels_to_input(levels: torch.Tensor, num_levels: int = 256, dtype=torch.float32) -> torch.Tensor:
    """Integer levels -> the model's float input ``level / (num_levels - 1)`` (``pixel / 255``)."""
    return levels.to(dtype) / (num_levels - 1)


def quantize(images: torch.Tensor, num_levels: int) -> torch.Tensor:
    """uint8 pixels -> ``num_levels`` integer levels (identity for 256), by integer arithmetic."""
    if num_levels == 256:
        return images
    return ((images.long() * num_levels) >> 8).to(torch.uint8)


def load_dataset(
    name: str,
    root: str | os.PathLike | None,
    *,
    train: bool = True,
    subset: int | None = None,
    download: bool = False,
) -> ImageData:
    """Load ``name`` ('mnist', 'fashion_mnist', 'cifar10' via torchvision, or 'synthetic').

    ``root`` is torchvision's root folder (holding ``MNIST/raw`` etc.); ``download`` lets torchvision
    fetch missing files where a network exists. ``subset`` keeps the first ``subset`` images.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if subset is not None and subset < 1:
        raise DataError(f"subset must be >= 1, got {subset}")
    if name == "synthetic":
        data = synthetic_bars(2048 if train else 512, seed=0 if train else 1)
    else:
        data = _load_torchvision(name, root, train=train, download=download)
    if subset is not None:
        data = ImageData(data.images[:subset], data.labels[:subset], data.num_classes)
    return data


def _load_torchvision(name: str, root, *, train: bool, download: bool) -> ImageData:
    if root is None:
        raise DataError(f"dataset {name!r} needs a data root folder")
    root = os.fspath(root)
    if not download and not os.path.isdir(root):
        raise DataError(f"data root {root!r} does not exist (pass download=True / --download to fetch {name})")
    datasets = import_torchvision().datasets
    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        with _download_lock(root, download):
            ds = cls(root=root, train=train, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. ..."
        reason = " ".join(str(error).split())[:300]  # e.g. the download's URL and network error
        raise DataError(f"{name} not found under data root {root!r} ({reason})") from None
    images = torch.as_tensor(np.asarray(ds.data))
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)  # -> [N, C, H, W]
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return ImageData(images.contiguous(), labels, DATASET_SHAPES[name][3])


@contextlib.contextmanager
def _download_lock(root: str, download: bool):
    """Serialise downloads into one root: several workers of a node may start at once."""
    if not download:
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".download.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def synthetic_bars(count: int, *, seed: int = 0, size: int = 12) -> ImageData:
    """A tiny two-class dataset for fast tests: class 0 horizontal bars, class 1 vertical bars.

    Each image has one or two bright bars (values near 255 with small noise) on a dark background,
    so a small model learns it in seconds and the two classes are visually distinct.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (count,), generator=g)
    images = torch.randint(0, 24, (count, 1, size, size), generator=g)
    starts = torch.randint(0, size - 2, (count, 2), generator=g)
    second = torch.rand(count, generator=g) < 0.5
    for k in range(count):
        for n, s in enumerate(starts[k]):
            if n == 1 and not second[k]:
                continue
            bar = (slice(None), slice(s, s + 2), slice(None))
            if labels[k] == 1:
                bar = (slice(None), slice(None), slice(s, s + 2))
            images[k][bar] = 255 - images[k][bar]
    return ImageData(images.to(torch.uint8), labels, 2)
