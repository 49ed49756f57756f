"""Image data as exact integer levels: torchvision's datasets, a synthetic one for tests, and your own
images (``images.py``).

``load_dataset`` holds a dataset in memory as ``uint8`` images ``[N, C, H, W]`` (MNIST is 47 MB) plus
``int64`` labels (the training jobs stream datasets too large for that through Ray Data). Training targets are those integers themselves, never reconstructed from floats
(``ceil(x * 255)`` maps 0 -> 0 but also shifts every other value; truncation after float maths
turns 255 * (k / 255) into k - 1 for some k). The model input is derived from the integers:
``levels_to_input``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
import torch

from ._torchvision import import_torchvision
from .errors import DataError, one_line
from .images import ImageOptions, Scan, background, find_images, in_test_split, read_range
from .options import option

# The flags of a data source that both jobs reading images take (the training config and the scoring
# request), declared here once: field name -> (default, help, the option's other arguments). Each job adds
# its own identity and --help group (``source_option``).
SOURCE_FLAGS = {
    "data_dir": ("./data", "torchvision root holding e.g. MNIST/raw (on every node)", {}),
    "download": (False, "let torchvision download missing data", {}),
    "test_fraction": (0.05, "your own images: the share held out as the test split, chosen by a hash of each "
                            "image's path or row, so it never changes", {}),
    "image_column": (None, "Parquet: the column of encoded images (default: image_png, else image)", {}),
    "skip_bad_images": (False, "skip files that do not decode (the job says how many) instead of refusing the "
                               "dataset", {}),
    "background": (None, "your own images: composite pixels that are not opaque onto this colour: white, black or "
                         "R,G,B (default: such images are refused, since what lies under a transparent pixel is "
                         "never seen and must not be learned)", {"parse": background, "metavar": "white|black|R,G,B"}),
}


def source_option(name: str, **kwargs):
    """The field of data-source flag ``name`` (``SOURCE_FLAGS``); ``kwargs``: its identity and ``--help``
    group in the config that takes it."""
    default, help, extra = SOURCE_FLAGS[name]
    return option(default, help, **extra, **kwargs)


DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")
# (channels, height, width, classes) of each dataset, known without loading it.
DATASET_SHAPES = {
    "mnist": (1, 28, 28, 10),
    "fashion_mnist": (1, 28, 28, 10),
    "cifar10": (3, 32, 32, 10),
    "synthetic": (1, 12, 12, 2),
}


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, C, H, W], integer levels
    labels: torch.Tensor  # int64 [N]
    num_classes: int
    keys: list[str] | None = None  # your own images: each one's key (its path, or file#row), see images.py
    classes: tuple[str, ...] = field(default=())  # class names, where the data has them

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
    root: str | os.PathLike | None = None,
    *,
    train: bool = True,
    subset: int | None = None,
    download: bool = False,
    filesystem: pafs.FileSystem | None = None,
    **image_options,
) -> ImageData:
    """Load a dataset into memory: ``name`` is 'mnist', 'fashion_mnist', 'cifar10' (torchvision's, under
    ``root``; ``download`` lets torchvision fetch missing files), 'synthetic', or the path or URI of your
    own images (a folder of image files or Parquet, local or ``s3://``, see ``images.py``; ``filesystem``
    reads it, default pyarrow's for the URI; ``image_options`` are ``ImageOptions``' fields).

    ``train`` picks the training split (for your own images: those outside the test split chosen by
    ``test_fraction``, all of them when it is 0). ``subset`` keeps the first ``subset`` images.
    """
    if subset is not None and subset < 1:
        raise DataError(f"subset must be >= 1, got {subset}")
    if name == "synthetic":
        data = synthetic_bars(2048 if train else 512, seed=0 if train else 1)
    elif name in DATASETS:
        data = _load_torchvision(name, root, train=train, download=download)
    elif "/" in name or "." in name or os.path.exists(name):  # a path or URI of your own images
        data = load_images(name, train=train, filesystem=filesystem, options=ImageOptions(**image_options))
    else:
        raise DataError(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}, or a folder or URI of images")
    if subset is not None:
        if subset > len(data):
            split = "training" if train else "test"
            raise DataError(f"{'--subset' if train else '--test-subset'} {subset} is more than the {len(data)} "
                            f"{split} images of {name}")
        data = ImageData(data.images[:subset], data.labels[:subset], data.num_classes,
                         None if data.keys is None else data.keys[:subset], data.classes)
    return data


def load_images(uri: str, *, train: bool = True, filesystem=None, options: ImageOptions = ImageOptions()) -> ImageData:
    """Your own images in memory (one split of them), read and checked as ``images.py`` describes."""
    source = find_images(uri, filesystem, options)
    fs = filesystem or source_filesystem(uri)
    rows = read_range(source, fs, 0, len(source), options)
    test = in_test_split(rows.keys, options.test_fraction)
    Scan().add(rows, test).check(source, test_fraction=options.test_fraction, needs_test=bool(options.test_fraction))
    return images_from_rows(rows, ~test if train else test, source)


def source_filesystem(uri: str) -> pafs.FileSystem:
    from .images import resolve

    return resolve(uri)[0]


def images_from_rows(rows, keep: np.ndarray, source) -> ImageData:
    """``Rows`` (``images.read_range``'s, or gathered from Ray Data) -> ImageData, in source order."""
    order = np.argsort(rows.index[keep], kind="stable")
    labels = rows.labels[keep][order]
    num_classes = len(source.classes) if source.file_labels is not None else (
        int(labels.max(initial=-1)) + 1 if len(labels) and labels.min() >= 0 else 0)
    return ImageData(
        torch.from_numpy(np.ascontiguousarray(rows.images[keep][order])),
        torch.from_numpy(np.maximum(labels, 0)), num_classes,
        list(np.asarray(rows.keys, dtype=object)[keep][order]),
        source.classes,
    )


def _load_torchvision(name: str, root, *, train: bool, download: bool) -> ImageData:
    if root is None:
        raise DataError(f"dataset {name!r} needs a data root folder")
    root = os.fspath(root)
    if not download and not os.path.isdir(root):
        raise DataError(f"data root {root!r} does not exist (pass download=True / --download to fetch {name})")
    if name in IDX_FOLDERS and not download:
        found = _read_idx(os.path.join(root, IDX_FOLDERS[name], "raw"), train)
        if found is not None:
            return found
    datasets = import_torchvision().datasets
    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    try:
        with _download_lock(root, download):
            ds = cls(root=root, train=train, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. ..."
        reason = one_line(error)  # e.g. the download's URL and network error
        raise DataError(f"{name} not found under data root {root!r} ({reason})") from None
    images = torch.as_tensor(np.asarray(ds.data))
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)  # -> [N, C, H, W]
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return ImageData(images.contiguous(), labels, DATASET_SHAPES[name][3])


# MNIST-like datasets: their folder under the root; torchvision keeps the files uncompressed in <folder>/raw.
IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _read_idx(raw: str, train: bool) -> ImageData | None:
    """An MNIST-like split read straight from its IDX files, as torchvision reads them (None if they are not
    there: torchvision then says what is missing). Importing torchvision costs ~2 s of CPU in every process
    that loads MNIST (the driver and each worker), more than reading the files."""
    prefix = "train" if train else "t10k"
    paths = [os.path.join(raw, f"{prefix}-{kind}-idx{dims}-ubyte") for kind, dims in (("images", 3), ("labels", 1))]
    if not all(os.path.isfile(path) for path in paths):
        return None
    arrays = []
    for path, dims in zip(paths, (3, 1)):
        data = np.fromfile(path, dtype=np.uint8)
        # The header: two zero bytes, the type (0x08: unsigned bytes), the number of dimensions, then each size
        # as a big-endian 32-bit integer.
        header = 4 + 4 * dims
        sizes = tuple(int(x) for x in np.frombuffer(data[4:header].tobytes(), dtype=">u4"))
        if data[:4].tolist() != [0, 0, 8, dims] or len(data) != header + int(np.prod(sizes)):
            raise DataError(f"{path} is not an IDX file of unsigned bytes with {dims} dimensions (corrupt?)")
        arrays.append(data[header:].reshape(sizes))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{raw}: {len(images)} images but {len(labels)} labels")
    return ImageData(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), 10)


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
