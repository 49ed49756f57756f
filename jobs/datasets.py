"""Your own images through Ray Data, for training and scoring: listed on the driver, then read and decoded
in parallel tasks across the cluster, with the storage's own filesystem (local, or S3 with the jobs'
endpoint and credential handling), so no node needs the dataset on its disk.

    ranges of image positions --from_items--> map_batches(read_range) --> {index, image, label}

A read task decodes a range of positions (``pixelcnn.images.read_range``, the library's one reader) and
keeps those of the split asked for. Positions, not Ray Data's block order, identify images: the
training loop sorts by them (data in memory) and the scoring job names its rows by them.

Before anything trains or scores, ``scan`` reads the whole source once and finds what would stop it
(undecodable files, images of several sizes or modes, missing labels, an empty split): one error line,
nothing written.
"""

from __future__ import annotations

import pickle

import numpy as np

from jobs.errors import JobError
from jobs.storage import S3Settings, check_bucket, open_storage
from pixelcnn.errors import DataError
from pixelcnn.images import ImageOptions, ImageSource, Scan, find_images, in_test_split, read_range

ROWS_PER_TASK = 1024  # images a read task decodes: enough to amortise a task, small enough to spread out
READ_CPUS = 0.5  # per read task: two run on a core beside the trainers' or actors' own


def find_source(uri: str, endpoint: str | None, options: ImageOptions) -> tuple[ImageSource, S3Settings | None]:
    """The listing of ``uri`` (local or s3://) and how tasks reach it."""
    storage = open_storage(uri, endpoint)
    check_bucket(storage)
    return find_images(uri, storage.fs, options), storage.s3


def read_images(source: ImageSource, s3: S3Settings | None, options: ImageOptions, *, split: str | None = None,
                rows_per_task: int = ROWS_PER_TASK):
    """A Ray Dataset of the source's images: ``index`` (int64), ``image`` (uint8 [C, H, W]), ``label``
    (int64, -1 without). ``split``: "train" or "test" keeps that part of the hashed split, None all."""
    import ray

    ranges = [{"start": a, "end": min(a + rows_per_task, len(source))} for a in range(0, len(source), rows_per_task)]
    return ray.data.from_items(ranges, override_num_blocks=len(ranges)).map_batches(  # Ray touchpoint: read tasks
        _read, batch_size=1, num_cpus=READ_CPUS,
        fn_kwargs={"source": ray.put(source), "s3": s3, "options": options, "split": split},
    )


def scan(source: ImageSource, s3: S3Settings | None, options: ImageOptions) -> Scan:
    """Read every image once, in Ray Data tasks, and merge what they found; a file that stops the dataset
    is a DataError naming it."""
    import ray

    ranges = [{"start": a, "end": min(a + ROWS_PER_TASK, len(source))} for a in range(0, len(source), ROWS_PER_TASK)]
    found = ray.data.from_items(ranges, override_num_blocks=len(ranges)).map_batches(
        _scan, batch_size=1, num_cpus=READ_CPUS,
        fn_kwargs={"source": ray.put(source), "s3": s3, "options": options},
    ).take_all()
    total = Scan()
    for row in sorted(found, key=lambda r: r["start"]):
        if row["error"]:
            raise DataError(row["error"])
        total.merge(pickle.loads(row["scan"]))
    return total


def _open(source_ref, s3):
    import ray

    source = ray.get(source_ref) if isinstance(source_ref, ray.ObjectRef) else source_ref
    return source, (s3.filesystem() if s3 else open_storage(source.root).fs)


def _read(batch: dict, source, s3, options: ImageOptions, split: str | None) -> dict:
    source, fs = _open(source, s3)
    rows = read_range(source, fs, int(batch["start"][0]), int(batch["end"][0]), options)
    keep = np.ones(len(rows.index), dtype=bool)
    if split is not None:
        test = in_test_split(rows.keys, options.test_fraction)
        keep = test if split == "test" else ~test
    return {"index": rows.index[keep], "image": rows.images[keep], "label": rows.labels[keep]}


def _scan(batch: dict, source, s3, options: ImageOptions) -> dict:
    source, fs = _open(source, s3)
    start = int(batch["start"][0])
    try:
        rows = read_range(source, fs, start, int(batch["end"][0]), options)
    except DataError as error:  # returned, not raised: the driver's one line is the error's own message
        return {"start": [start], "error": [str(error)], "scan": [b""]}
    found = Scan().add(rows, in_test_split(rows.keys, options.test_fraction))
    return {"start": [start], "error": [""], "scan": [pickle.dumps(found)]}


def gather(iterator) -> dict:
    """A Ray Data iterator's rows, whole and sorted by position: the same arrays on every worker."""
    parts = list(iterator.iter_batches(batch_size=4096, batch_format="numpy"))
    if not parts:
        raise JobError("the dataset gave this worker no rows")
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index, kind="stable")
    return {name: np.concatenate([p[name] for p in parts])[order] for name in ("index", "image", "label")}
