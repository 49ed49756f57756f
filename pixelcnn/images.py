"""Your own images as exact 8-bit levels: a folder of image files, or Parquet files with an image column.

One reader for the library (``load_dataset("some/folder")``), training and scoring (``jobs/datasets.py``
runs the same functions in Ray Data tasks). It works on any pyarrow filesystem: local folders, or S3
through the filesystem object the caller passes (or pyarrow's own for an ``s3://`` URI).

* A folder is listed recursively for files Pillow decodes (by extension). When every image lies inside
  a top-level subfolder (``cats/x.png``, ``dogs/y/z.jpg``) the subfolders are classes, sorted by name, as
  torchvision's ImageFolder has them; otherwise the images have no labels.
* Parquet (a file, a folder of them, or a glob) holds an image column of encoded image bytes:
  ``image_png`` (what ``jobs/generate.py`` writes), or ``image``, also as Hugging Face's
  ``{bytes, path}`` struct; and optionally an integer ``label`` column.

The images of a source are numbered 0..N-1 in a fixed order (files sorted by path, rows in file order),
and each has a key: its path relative to the source's root, plus ``#row`` in a Parquet file. The key
names the image in errors and in the scoring job's rows, and decides the held-out test split: an image
is in it when a hash of its key falls below ``test_fraction``, so the split never changes between
runs, resumes, worker counts, or between a local copy and one on S3.

Decoded values are the targets, as uint8: never reconstructed from floats. Each image is turned as its
EXIF orientation says, as viewers show it. Pixels that are not opaque (an alpha channel, or PNG tRNS
transparency) are refused unless ``background`` names a colour to composite them onto: what lies under a
transparent pixel is never seen, so it must never be learned; a fully opaque alpha channel is dropped.
A 16-bit image whose every value is a multiple of 257 is 8-bit levels (``value // 257``); others are
refused. Without ``image_size`` and ``channels`` every image must then share one size and mode (L or RGB);
``image_size`` resizes each image to cover the size with Pillow's Lanczos filter, then centre-crops it
(an image of that size already is left untouched); ``channels`` converts with Pillow (L or RGB).

File names need not be UTF-8: a local folder is listed with ``os`` (a name that is not UTF-8, say Latin-1
``b'caf\\xe9.png'``, arrives as a surrogate-escaped str, ``os.fsdecode``'s, which ``open()`` takes back),
and keys and URIs show such a byte escaped (``caf\\xe9.png``), so they are valid UTF-8 wherever they go.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import itertools
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, one_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
IMAGE_COLUMNS = ("image_png", "image")  # looked for in this order when no column is named
NATIVE_MODES = {"L": 1, "RGB": 3}  # modes taken as they are; others need --channels to convert
RESIZE_FILTER = Image.Resampling.LANCZOS
ALPHA_MODES = {"RGBA": "RGB", "LA": "L", "PA": "P", "RGBa": "RGB", "La": "L"}  # mode -> the mode without alpha
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # single-channel integer images (I: 32-bit)
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


def encode_png(image) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1 or 3; an array or a CPU tensor) -> PNG bytes (lossless): how the jobs
    store images in Parquet."""
    array = np.asarray(image, dtype=np.uint8)
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # fast; size barely differs
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes (a row's ``image_png``) -> uint8 ``[C, H, W]``."""
    array = np.array(Image.open(io.BytesIO(data)))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def background(text: str) -> tuple[int, int, int]:
    """``--background`` white, black or R,G,B (each 0..255)."""
    if text.strip().lower() in BACKGROUNDS:
        return BACKGROUNDS[text.strip().lower()]
    try:
        rgb = tuple(int(v) for v in text.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"--background must be white, black or R,G,B with each 0..255, got {text!r}")
    return rgb


@dataclass(frozen=True)
class ImageOptions:
    """How images become levels, and which of them are held out. Parquet columns default as above."""

    image_size: tuple[int, int] | None = None  # (height, width): resize and centre-crop
    channels: int | None = None  # 1 (L) or 3 (RGB): convert
    image_column: str | None = None
    label_column: str | None = None
    test_fraction: float = 0.05
    skip_bad_images: bool = False  # skip (and count) files that do not decode, instead of refusing
    background: tuple[int, int, int] | None = None  # (R, G, B) to composite transparent pixels onto

    def __post_init__(self):
        if self.background is not None:
            try:
                value = background(self.background) if isinstance(self.background, str) else \
                    background(",".join(str(int(v)) for v in self.background))
            except (TypeError, ValueError) as error:
                raise DataError(one_line(error)) from None
            object.__setattr__(self, "background", value)
        if self.image_size is not None:
            object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
            if len(self.image_size) != 2 or min(self.image_size) < 1:
                raise DataError(f"--image-size must be H or HxW with sides >= 1, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise DataError(f"--channels must be 1 or 3, got {self.channels}")
        if not 0 <= self.test_fraction < 1:
            raise DataError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class ImageSource:
    """The listing of an image dataset: what to read, in which order, and its fingerprint."""

    uri: str
    kind: str  # "folder" or "parquet"
    root: str  # the root's path on the filesystem; keys are relative to it
    files: tuple[str, ...]  # paths on the filesystem, sorted
    counts: tuple[int, ...]  # images in each file (1 for an image file)
    file_labels: tuple[int, ...] | None  # folder with classes: each file's class
    classes: tuple[str, ...]  # folder class names (sorted); () without
    image_column: str | None = None
    label_column: str | None = None  # Parquet: the label column, None if it has none
    fingerprint: str = ""
    offsets: np.ndarray = field(default=None, repr=False, compare=False)  # first index of each file

    def __post_init__(self):
        object.__setattr__(self, "offsets", np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def has_labels(self) -> bool:
        return self.file_labels is not None or self.label_column is not None

    def key(self, file: int, row: int | None = None) -> str:
        relative = posixpath.relpath(self.files[file], self.root) if self.files[file] != self.root else \
            posixpath.basename(self.root)
        return shown(relative if self.kind == "folder" else f"{relative}#{row}")

    def uri_of(self, file: int) -> str:
        """A file's URI, for people (and the scoring job's ``source`` column): the source's scheme and the
        file's path, a name that is not UTF-8 shown escaped."""
        scheme = urlparse(self.uri).scheme
        return shown(f"{scheme}://{self.files[file]}" if scheme and scheme != "file" else self.files[file])


def shown(name: str) -> str:
    """A file name as valid UTF-8 text: a byte that is not UTF-8 (held as os.fsdecode's surrogate escape)
    written as ``\\xe9``. ``files`` keep the surrogate-escaped names, which ``open()`` takes back; what
    leaves Python (keys in error lines and the test split's hash, Arrow string columns such as the scoring
    job's ``source``, Ray Data blocks, JSON) gets this form, since a surrogate cannot be encoded as UTF-8.
    A name that is UTF-8 already is unchanged, so keys, the split and fingerprints of such data never move."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --- listing -------------------------------------------------------------------------------------


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or URI; with ``filesystem`` given, the URI's path on it."""
    parsed = urlparse(uri)
    if filesystem is not None:
        if parsed.scheme in ("s3", "gs", "gcs", "hdfs"):
            return filesystem, f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return filesystem, os.path.abspath(os.path.expanduser(parsed.path if parsed.scheme == "file" else uri))
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(parsed.path if parsed.scheme else uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, pa.ArrowInvalid) as error:
        raise DataError(f"cannot open {uri}: {one_line(error)}") from None


def find_images(uri: str, filesystem: pafs.FileSystem | None = None, options: ImageOptions = ImageOptions()) -> ImageSource:
    """List the images under ``uri``: a folder of image files, or Parquet (a file, folder or glob)."""
    fs, path = resolve(uri, filesystem)
    pattern = None
    if any(ch in posixpath.basename(path) for ch in "*?["):
        path, pattern = posixpath.dirname(path), posixpath.basename(path)
    try:
        listed = _list_files(fs, path)
    except OSError as error:  # a missing bucket, denied access, an unreachable endpoint
        raise DataError(f"cannot read dataset {uri}: {one_line(error)}") from None
    if listed is None:
        raise DataError(f"dataset {uri} does not exist")
    entries, root = listed
    files = sorted((e for e in entries if not _hidden(e.path, root)), key=lambda e: e.path)
    if pattern:
        files = [e for e in files if fnmatch.fnmatch(posixpath.basename(e.path), pattern)]
    parquet = [e for e in files if e.path.endswith(".parquet")]
    images = [e for e in files if e.path.lower().endswith(IMAGE_EXTENSIONS)]
    if parquet:
        return _parquet_source(uri, fs, root, parquet, options)
    if not images:
        raise DataError(f"dataset {uri} holds no images (no {', '.join(IMAGE_EXTENSIONS)} or .parquet files)")
    return _folder_source(uri, root, images)


class Entry(NamedTuple):
    path: str
    size: int


def _list_files(fs: pafs.FileSystem, path: str) -> tuple[list[Entry], str] | None:
    """(the files at or under ``path``, the root their keys are relative to); None if nothing is there."""
    if not isinstance(fs, pafs.LocalFileSystem):  # S3 keys are UTF-8 by definition
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        if info.type == pafs.FileType.File:
            return [Entry(info.path, info.size)], posixpath.dirname(path)
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return [Entry(e.path, e.size) for e in found if e.type == pafs.FileType.File], path
    # Local folders with os, not pyarrow: pyarrow decodes every name as UTF-8 and fails on a folder holding
    # one that is not (naming no file). Like pyarrow's listing, this follows links, leaves out broken ones
    # and raises on a folder it cannot read.
    if os.path.isfile(path):
        return [Entry(path, os.path.getsize(path))], posixpath.dirname(path)
    if not os.path.isdir(path):
        return None
    entries = []
    for folder, _, names in os.walk(path, followlinks=True, onerror=_raise):
        for name in names:
            try:
                info = os.stat(posixpath.join(folder, name))
            except FileNotFoundError:  # a broken link
                continue
            if stat.S_ISREG(info.st_mode):
                entries.append(Entry(posixpath.join(folder, name), info.st_size))
    return entries, path


def _raise(error: OSError):
    raise error


def _open(fs: pafs.FileSystem, path: str, stream: bool = False):
    """A file to read (``stream``: read whole, front to back): locally through Python's open(), which takes
    a name that is not UTF-8 (pyarrow's cannot)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return open(path, "rb")
    return fs.open_input_stream(path) if stream else fs.open_input_file(path)


def _hidden(path: str, root: str) -> bool:
    """Files whose name, or a folder's on the way from the root, starts with '.' or '_' (our own
    ``_manifest.json``, temporaries), as Parquet readers skip them."""
    parts = posixpath.relpath(path, root).split("/")
    return any(part.startswith((".", "_")) for part in parts)


def _folder_source(uri: str, root: str, entries) -> ImageSource:
    relative = [posixpath.relpath(e.path, root).split("/") for e in entries]
    labelled = all(len(parts) > 1 for parts in relative)
    classes = tuple(sorted({parts[0] for parts in relative})) if labelled else ()
    index = {name: k for k, name in enumerate(classes)}
    listing = "\n".join(f"{'/'.join(parts)}\t{e.size}" for parts, e in zip(relative, entries))
    return ImageSource(
        uri=uri, kind="folder", root=root, files=tuple(e.path for e in entries), counts=(1,) * len(entries),
        file_labels=tuple(index[parts[0]] for parts in relative) if labelled else None,
        classes=tuple(shown(c) for c in classes),  # recorded in config.json, so valid UTF-8
        fingerprint=hashlib.sha256(listing.encode(errors="surrogateescape")).hexdigest(),  # a name's own bytes
    )


def _parquet_source(uri: str, fs, root: str, entries, options: ImageOptions) -> ImageSource:
    counts, image_column, label_column = [], options.image_column, options.label_column
    for e in entries:
        name = shown(e.path)
        try:
            with _open(fs, e.path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowInvalid) as error:
            raise DataError(f"{name} is not a readable Parquet file ({one_line(error)})") from None
        names = schema.names
        if image_column is None:
            image_column = next((c for c in IMAGE_COLUMNS if c in names), None)
            if image_column is None:
                raise DataError(f"{name} has no image column ({' or '.join(IMAGE_COLUMNS)}; --image-column "
                                f"names another): its columns are {', '.join(names)}")
        if image_column not in names:
            raise DataError(f"{name} has no column {image_column!r}: its columns are {', '.join(names)}")
        if options.label_column is not None and options.label_column not in names:
            raise DataError(f"{name} has no column {options.label_column!r}: its columns are {', '.join(names)}")
        if options.label_column is None and label_column is None and "label" in names:
            label_column = "label"
        if label_column is not None and not pa.types.is_integer(schema.field(label_column).type):
            if not pa.types.is_null(schema.field(label_column).type):
                raise DataError(f"{name}: label column {label_column!r} holds {schema.field(label_column).type}, "
                                "not integers")
        counts.append(meta.num_rows)
    listing = "\n".join(f"{posixpath.relpath(e.path, root)}\t{e.size}\t{n}" for e, n in zip(entries, counts))
    if not sum(counts):
        raise DataError(f"dataset {uri} holds no images (its Parquet files have no rows)")
    return ImageSource(
        uri=uri, kind="parquet", root=root, files=tuple(e.path for e in entries), counts=tuple(counts),
        file_labels=None, classes=(), image_column=image_column, label_column=label_column,
        fingerprint=hashlib.sha256(f"{image_column}\t{label_column}\n{listing}".encode(errors="surrogateescape")).hexdigest(),
    )


# --- reading and decoding ------------------------------------------------------------------------


@dataclass
class Rows:
    """Images ``start..end`` of a source, decoded: what every reader of a range returns."""

    index: np.ndarray  # int64 [n], position in the source
    keys: list[str]
    images: np.ndarray  # uint8 [n, C, H, W]
    labels: np.ndarray  # int64 [n], -1: no label
    modes: list[str]  # each image's mode before conversion (for the scan's consistency check)
    sizes: list[tuple[int, int]]  # each image's (height, width) before resizing
    bad: list[str] = field(default_factory=list)  # keys that did not decode (skip_bad_images)


def read_range(source: ImageSource, fs: pafs.FileSystem, start: int, end: int, options: ImageOptions) -> Rows:
    """Read and decode images ``start..end - 1``. A file that does not decode is a ``DataError`` naming
    it, or with ``skip_bad_images`` is left out and listed in ``Rows.bad``."""
    index, keys, arrays, labels, modes, sizes, bad = [], [], [], [], [], [], []
    first = int(np.searchsorted(source.offsets, start, side="right")) - 1
    for file in range(first, len(source.files)):
        lo = int(source.offsets[file])
        if lo >= end:
            break
        rows = range(max(start, lo) - lo, min(end, int(source.offsets[file + 1])) - lo)
        if not len(rows):  # a Parquet file without rows
            continue
        for row, data, label in _encoded(source, fs, file, rows):
            key = source.key(file, row)
            try:
                array, mode, size = decode_image(data, key, options)
            except DataError:
                if not options.skip_bad_images:
                    raise
                bad.append(key)
                continue
            if label is not None and label < 0:
                raise DataError(f"{key}: label {label} is out of range (labels are class indices >= 0)")
            index.append(lo + row)
            keys.append(key)
            arrays.append(array)
            labels.append(-1 if label is None else label)
            modes.append(mode)
            sizes.append(size)
    if arrays and len({a.shape for a in arrays}) > 1:  # report the first two that differ, by key
        raise DataError(_mismatch(keys, arrays, modes, sizes))
    images = np.stack(arrays) if arrays else np.zeros((0, options.channels or 1, *(options.image_size or (1, 1))),
                                                       dtype=np.uint8)
    return Rows(np.asarray(index, dtype=np.int64), keys, images, np.asarray(labels, dtype=np.int64), modes, sizes, bad)


def _encoded(source: ImageSource, fs, file: int, rows: range):
    """(row, encoded bytes, label or None) for ``rows`` of one file."""
    path = source.files[file]
    try:
        if source.kind == "folder":
            with _open(fs, path, stream=True) as f:
                data = f.read()
            yield 0, data, None if source.file_labels is None else source.file_labels[file]
            return
        columns = [source.image_column] + ([source.label_column] if source.label_column else [])
        with _open(fs, path) as f:
            parquet = pq.ParquetFile(f)
            # Only the row groups that hold the rows asked for: a range is a small part of a large file.
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)])
            groups = [g for g in range(len(sizes)) if starts[g] < rows.stop and starts[g + 1] > rows.start]
            table = parquet.read_row_groups(groups, columns=columns)
            table = table.slice(rows.start - int(starts[groups[0]]), len(rows))
    except (OSError, pa.ArrowInvalid) as error:
        raise DataError(f"cannot read {source.uri_of(file)}: {one_line(error)}") from None
    images = table.column(source.image_column).to_pylist()
    labels = table.column(source.label_column).to_pylist() if source.label_column else [None] * len(images)
    for row, value, label in zip(rows, images, labels):
        if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        yield row, value, label


def decode_image(data: bytes | None, key: str, options: ImageOptions) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Encoded bytes -> (uint8 ``[C, H, W]``, the image's own mode, its own (height, width))."""
    try:
        image = Image.open(io.BytesIO(data or b""))
        image.load()
        # As viewers show it: a camera stores a portrait photo sideways, with an EXIF tag saying so.
        ImageOps.exif_transpose(image, in_place=True)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{key} is not a decodable image ({one_line(error) or type(error).__name__})") from None
    size = (image.height, image.width)
    image, mode = _opaque(_eight_bit(image, key), key, options.background)
    if options.channels is not None:
        image = image.convert("L" if options.channels == 1 else "RGB")
    elif mode not in NATIVE_MODES:
        raise DataError(f"{key} is a {mode} image: pass --channels 1 or 3 to convert it to L or RGB")
    if options.image_size is not None and (image.height, image.width) != options.image_size:
        image = _cover_and_crop(image, options.image_size)
    array = np.asarray(image, dtype=np.uint8)
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy(), mode, size


def _eight_bit(image: Image.Image, key: str) -> Image.Image:
    """A 16-bit (or 32-bit integer) single-channel image as L, when every value is a multiple of 257 (an
    8-bit image saved at 16 bits: 0, 257, ..., 65535 are 0, 1, ..., 255); refused otherwise, since rounding
    would invent levels the image does not have. (Pillow itself reads 16-bit RGB as 8-bit.)"""
    if image.mode == "F":
        raise DataError(f"{key} is a floating-point image: convert it to 8-bit first")
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).astype(np.int64)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535 or (values % 257).any():
        raise DataError(f"{key} is a 16-bit image whose values are not all 8-bit levels (multiples of 257): "
                        "convert it to 8-bit first")
    eight = Image.fromarray((values // 257).astype(np.uint8), "L")
    transparent = image.info.get("transparency")  # tRNS: one value that is transparent
    if isinstance(transparent, int) and transparent % 257 == 0:  # another value matches no pixel
        eight.info["transparency"] = transparent // 257
    return eight


def _opaque(image: Image.Image, key: str, background: tuple[int, int, int] | None) -> tuple[Image.Image, str]:
    """(the image without alpha, its mode for the native-mode check and messages). An alpha channel or tRNS
    transparency that leaves every pixel opaque is dropped; otherwise the image is composited onto
    ``background``, or refused without one: what lies under a transparent pixel (often a leftover colour)
    is never seen, and a model must not learn it."""
    base = ALPHA_MODES.get(image.mode, image.mode)
    if base == image.mode and "transparency" not in image.info:
        return image, image.mode
    grey = base in ("1", "L") and (background is None or len(set(background)) == 1)  # a colour background: RGB
    pixels = np.asarray(image.convert("LA" if grey else "RGBA"))
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    if alpha.min() < 255:
        if background is None:
            raise DataError(f"{key} has transparent pixels: pass --background white, black or R,G,B to composite it "
                            "onto that colour (what lies under them must not be learned)")
        a, under = alpha.astype(np.uint32), np.asarray(background[:colour.shape[-1]], dtype=np.uint32)
        colour = ((colour * a + under * (255 - a) + 127) // 255).astype(np.uint8)  # exact at alpha 0 and 255
    image = Image.fromarray(colour[..., 0] if grey else np.ascontiguousarray(colour), "L" if grey else "RGB")
    return image, image.mode if base in NATIVE_MODES else base  # a palette image still needs --channels


def _cover_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize (Lanczos) to the smallest size that covers ``size`` (height, width), keeping the aspect,
    then cut the centre."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    covered = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(covered, RESIZE_FILTER)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _mismatch(keys, arrays, modes, sizes) -> str:
    first = next(k for k in range(len(arrays)) if arrays[k].shape != arrays[0].shape)
    return (f"images differ in size or mode: {keys[0]} is {sizes[0][0]}x{sizes[0][1]} {modes[0]}, {keys[first]} "
            f"is {sizes[first][0]}x{sizes[first][1]} {modes[first]}: pass --image-size and --channels to make them one")


@dataclass
class Scan:
    """What a pass over a source found, merged over its ranges: counts, the shapes seen (with an example
    each), labels and undecodable files. ``check`` turns it into the first refusal, if any."""

    images: int = 0
    test: int = 0
    bad: int = 0
    bad_keys: list[str] = field(default_factory=list)  # the first few
    shapes: dict = field(default_factory=dict)  # (C, H, W) -> (key, mode, (height, width)) of its first image
    unlabelled: int = 0
    top_label: int = -1
    labels: set = field(default_factory=set)  # the label values seen

    def add(self, rows: Rows, test: np.ndarray) -> "Scan":
        self.images += len(rows.index)
        self.test += int(test.sum())
        self.bad += len(rows.bad)
        self.bad_keys = (self.bad_keys + rows.bad)[:5]
        if len(rows.index):
            self.shapes.setdefault(tuple(rows.images.shape[1:]), (rows.keys[0], rows.modes[0], rows.sizes[0]))
        self.unlabelled += int((rows.labels < 0).sum())
        self.top_label = max(self.top_label, int(rows.labels.max(initial=-1)))
        self.labels.update(np.unique(rows.labels[rows.labels >= 0]).tolist())
        return self

    def merge(self, other: "Scan") -> "Scan":
        self.images += other.images
        self.test += other.test
        self.bad += other.bad
        self.bad_keys = (self.bad_keys + other.bad_keys)[:5]
        for shape, example in other.shapes.items():
            self.shapes.setdefault(shape, example)
        self.unlabelled += other.unlabelled
        self.top_label = max(self.top_label, other.top_label)
        self.labels |= other.labels
        return self

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.shapes))

    def check(self, source: ImageSource, *, test_fraction: float, needs_test: bool = True) -> None:
        """Refuse what cannot be trained on or scored: nothing decodable, images of several shapes, a
        partly labelled source, an empty test split."""
        if not self.images:
            raise DataError(f"dataset {source.uri} holds no decodable image ({self.bad} skipped: {', '.join(self.bad_keys)})")
        if len(self.shapes) > 1:
            (a, (ka, ma, sa)), (b, (kb, mb, sb)) = list(self.shapes.items())[:2]
            raise DataError(f"images differ in size or mode: {ka} is {sa[0]}x{sa[1]} {ma}, {kb} is {sb[0]}x{sb[1]} "
                            f"{mb}: pass --image-size and --channels to make them one")
        if source.has_labels and self.unlabelled and self.unlabelled < self.images:
            raise DataError(f"dataset {source.uri}: {self.unlabelled} of {self.images} images have no label")
        if needs_test and test_fraction and not self.test:
            raise DataError(f"the test split of {source.uri} is empty ({self.images} images, --test-fraction "
                            f"{test_fraction}): raise --test-fraction or pass --test-dataset")
        if needs_test and self.test == self.images:
            raise DataError(f"the training split of {source.uri} is empty: every image fell into the test split")

    @property
    def num_classes(self) -> int:
        return self.top_label + 1 if self.unlabelled == 0 else 0


def class_count(labels, uri: str) -> int:
    """K, for integer labels that are the classes 0..K-1, each present; a DataError otherwise. A gap (labels
    0, 1, 5) would make a model of classes no image was trained on, which default generation then samples.
    Refused rather than mapped to 0..K-1: a mapping would have to follow the model into generation's
    --label and scoring's label column, where label 5 would silently mean class 2."""
    labels = sorted({int(v) for v in labels})
    count = labels[-1] + 1 if labels else 0
    if len(labels) != count:
        present = set(labels)
        missing = list(itertools.islice((k for k in range(count) if k not in present), 10))  # a label may be huge
        found, missing = _some(labels, len(labels)), _some(missing, count - len(labels))
        raise DataError(f"dataset {uri}: labels must be 0..K-1 with every class present: found {found} (missing {missing})")
    return count


def _some(values: list[int], total: int) -> str:
    """The first ten of ``total`` values, for an error line."""
    return ", ".join(map(str, values[:10])) + (f", ... ({total} in all)" if total > 10 else "")


def in_test_split(keys, fraction: float) -> np.ndarray:
    """Whether each key is in the held-out test split: a hash of the key below ``fraction``."""
    if not fraction:
        return np.zeros(len(keys), dtype=bool)
    digests = [int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") for k in keys]
    return np.asarray(digests, dtype=np.uint64) < np.uint64(int(fraction * 2**64))
