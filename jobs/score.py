"""Score images in bulk with Ray Data: the exact log-likelihood of every image of a dataset, as Parquet.

    ray job submit --working-dir . -- python jobs/score.py --checkpoint s3://bucket/runs/mnist \\
        --dataset s3://bucket/my-images --output s3://bucket/scores/my-images --num-actors 4 --gpus-per-actor 1

The pipeline (its Ray touchpoints read top-down in ``run_pipeline``):

    shards of missing ids --from_items--> map_batches(read, CPU tasks) --> map_batches(ScoreShards, actors)
        --> map_batches(encode_rows, CPU tasks) --> AtomicParquetSink

The images of the dataset are numbered 0..N-1 (``pixelcnn/images.py``: files sorted by path, rows in
file order). CPU tasks read and decode a shard of --rows-per-file ids, an actor runs the model's
teacher-forced forward pass over it in batches of --batch-size, and CPU tasks build its rows, one Parquet
file per shard, written exactly once and resumed where it stopped, as generate.py's (``jobs/outputs.py``).
docs/scoring.md has the whole story.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import numpy as np  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import torch  # noqa: E402

from jobs import outputs  # noqa: E402
from jobs.actors import ModelActor, actor_cpus  # noqa: E402
from jobs.cli import ActorPoolOptions, ArgumentParser, add_options, class_probs, options_of  # noqa: E402
from jobs.cluster import init_ray, one_error_line  # noqa: E402
from jobs.datasets import READ_CPUS, find_source, scan  # noqa: E402
from jobs.schema import SCORE_SCHEMA, score_table  # noqa: E402
from jobs.storage import Storage, check_bucket, check_writable, open_storage, read_checkpoint  # noqa: E402
from pixelcnn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from pixelcnn.data import DATASETS, load_dataset, source_option  # noqa: E402
from pixelcnn.errors import DataError  # noqa: E402
from pixelcnn.figures import score_report_png  # noqa: E402
from pixelcnn.images import ImageOptions, in_test_split, read_range  # noqa: E402
from pixelcnn.likelihood import score  # noqa: E402
from pixelcnn.options import option  # noqa: E402

REPORT = "_report.png"
ENCODE_CPUS = 0.25
WRITE_CPUS = 0.25
DTYPES = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreRequest(ActorPoolOptions):
    dataset: str = option(help="images to score: mnist, fashion_mnist, cifar10 (torchvision), or a folder, Parquet "
                          "file/folder/glob of your own images, local or s3://")
    split: str = option("all", "all images, or the train or test split (your own images: by --test-fraction's hash, "
                        "as training takes them)", choices=("all", "train", "test"))
    test_fraction: float = source_option("test_fraction")  # with --split train/test: as in training
    data_dir: str = source_option("data_dir")
    download: bool = source_option("download")
    image_column: str | None = source_option("image_column")
    label_column: str | None = option(None, "Parquet: the integer label column; conditional models are then scored "
                                      "under each image's label")
    use_labels: bool = option(False, "conditional models: score under each image's own label (class subfolder, "
                              "torchvision target or Parquet label column) instead of marginalising over classes")
    label_probs: str | None = option(None, "conditional models, marginalised: comma-separated class prior (default: "
                                     "uniform)")
    resize: bool = option(False, "resize (Lanczos, centre-crop) and convert images to the model's size and channels "
                          "(default: images the model cannot take are refused)")
    skip_bad_images: bool = source_option("skip_bad_images")
    background: tuple[int, int, int] | None = source_option("background")
    per_pixel: bool = option(False, "add nll_png, a heat map of each pixel's NLL (bits/dim, 0..255 for 0..16 bits)")
    dtype: str = option("float32", "precision of the forward pass (recorded in the dtype column); float64 for exact "
                        "figures, bfloat16 for speed on GPUs", choices=DTYPES)
    report: int = option(0, "also write _report.png: the N least and N most likely images with their bits/dim, and "
                         "a histogram")

    def default_batch_size(self) -> int:
        return 1024 if self.gpus_per_actor > 0 else 256

    def __post_init__(self):
        super().__post_init__()
        if self.report < 0:
            raise ValueError(f"--report must be >= 0, got {self.report}")
        ImageOptions(test_fraction=self.test_fraction)  # its checks (a ValueError: one error line)
        if self.label_probs is not None and (self.use_labels or self.label_column):
            raise ValueError("--label-probs is the prior of marginalised scores: not with --use-labels/--label-column")

    @property
    def own_images(self) -> bool:
        return self.dataset not in DATASETS


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What an output holds: its identity fields must match for a rerun to write into it."""

    checkpoint: str
    dataset: str
    model_sha256: str = option(identity=True, help="")
    data_fingerprint: str = option(identity=True, help="")  # the listing: files, sizes, row counts
    split: str = option(identity=True, help="")
    test_fraction: float | None = option(identity=True, help="")
    image_size: list[int] | None = option(identity=True, help="")
    channels: int | None = option(identity=True, help="")
    labels: str = option(identity=True, help="")  # "none", "own" or "marginal"
    label_probs: list[float] | None = option(identity=True, help="")
    per_pixel: bool = option(identity=True, help="")
    dtype: str = option(identity=True, help="")
    background: list[int] | None = option(None, identity=True, help="")  # what transparent pixels are composited onto
    shape: list[int] = dataclasses.field(default_factory=list)  # (C, H, W) of the model
    rows_per_file: int = 10000  # the layout: a rerun writes the files of the one the output was started with
    kind: str = "scoring"  # which job's output: a generation job is refused it as such (jobs/outputs.py)


SPLIT = "split the images into sets of at most {ids}, each scored into its own --output"


def main(argv=None) -> dict:
    request = parse_args(argv)
    with one_error_line("scoring", request.s3_endpoint):
        checkpoint_uri, checkpoint = read_checkpoint(request.checkpoint, request.s3_endpoint)
        ckpt = load_checkpoint(checkpoint, name=checkpoint_uri)
        model_from_checkpoint(ckpt, source=f"checkpoint {checkpoint_uri}")
        # Shards too large for an actor to hold are refused before Ray starts (too many files only once
        # the images are counted, in outputs.resume).
        row_bytes = shard_row_bytes(ckpt["data_shape"], request.per_pixel, checkpoint_uri)
        outputs.check_rows_per_file(request.rows_per_file, row_bytes)
        output = open_storage(request.output, request.s3_endpoint)
        check_bucket(output)  # reading only: a request refused below leaves the output as it was
        classes = ckpt["model_config"].get("num_classes", 0)
        labels = "none" if not classes else "own" if request.use_labels or request.label_column else "marginal"
        manifest = Manifest(
            checkpoint=checkpoint_uri, dataset=request.dataset, model_sha256=hashlib.sha256(checkpoint).hexdigest(),
            data_fingerprint="", split=request.split,
            test_fraction=request.test_fraction if request.split != "all" and request.own_images else None,
            image_size=list(ckpt["data_shape"][1:]) if request.resize else None,
            channels=ckpt["data_shape"][0] if request.resize else None, labels=labels,
            background=list(request.background) if request.background and request.own_images else None,
            label_probs=class_probs(request.label_probs, classes) if labels == "marginal" else None, per_pixel=request.per_pixel,
            dtype=request.dtype, shape=list(ckpt["data_shape"]), rows_per_file=request.rows_per_file,
        )
        outputs.check_kind(output, manifest)  # a generation output: refused before Ray starts
        init_ray(request.address)
        source = open_source(request, manifest)  # lists and scans the images (Ray Data tasks), reading only
        manifest = dataclasses.replace(manifest, data_fingerprint=source.fingerprint)
        manifest, done, shards = outputs.resume(output, manifest, len(source), repair_overlaps=request.repair,
                                                row_bytes=row_bytes, split=SPLIT)
        todo = sum(end - start for start, end in shards)
        started = time.time()
        pipeline_started = (run_pipeline(request, output, checkpoint, manifest, source, shards, bool(done))
                            if todo else None)
        times = outputs.timings(todo, started, pipeline_started, time.time())
        done = outputs.part_ranges(output)
        bits = read_bits(output, done)
        if request.report and (todo or output.read(REPORT) is None):
            write_report(output, done, source, request.report)
    summary = summarise(bits, todo, times, output, done, source)
    print(json.dumps(summary), flush=True)
    return summary


def run_pipeline(request: ScoreRequest, output: Storage, checkpoint: bytes, manifest: Manifest, source, shards: list,
                 has_parts: bool) -> float | None:
    """Score and write ``shards``; returns when the first shard reached an actor (time.time())."""
    import ray

    actors = min(request.num_actors, len(shards))  # no more actors than shards: an idle one holds its GPU for nothing
    cpus = actor_cpus(actors=actors, most=actors, gpus_per_actor=request.gpus_per_actor,
                      cpus_per_actor=request.cpus_per_actor, others=READ_CPUS + ENCODE_CPUS + WRITE_CPUS,
                      wait=request.wait_for_resources, what="scoring")
    check_writable(output)
    with outputs.Lease(output, "score.py"):
        outputs.claim(output, manifest, has_parts=has_parts)
        items = [{"start": start, "end": end} for start, end in shards]
        source_ref = ray.put(source)
        # Ray touchpoints: CPU tasks read and decode one shard of images each ...
        images = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_shard, batch_size=1, num_cpus=READ_CPUS, fn_kwargs={"source": source_ref},
        )
        # ... actors run the model's forward pass over it ...
        scores = images.map_batches(
            ScoreShards, batch_size=None, compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=request.gpus_per_actor, num_cpus=cpus,
            fn_constructor_kwargs={"checkpoint": checkpoint, "manifest": manifest, "batch_size": request.batch_size,
                                   "gpu": request.gpus_per_actor > 0, "cpus": cpus},
        )
        # ... CPU tasks build its rows (and heat maps), and the sink writes them whole.
        rows = scores.map_batches(encode_rows, batch_size=None, num_cpus=ENCODE_CPUS,
                                  fn_kwargs={"manifest": manifest, "source": source_ref})
        sink = outputs.make_sink(output, SCORE_SCHEMA)
        rows.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
        return sink.started


def shard_row_bytes(data_shape, per_pixel: bool, checkpoint_uri: str) -> int:
    """What a row of a shard takes in memory, at most: its decoded image twice (read tasks stack them),
    with --per-pixel its float32 NLL map and that map's PNG, and the other columns."""
    channels, height, width = data_shape
    return (2 * channels * height * width + (5 * height * width + height if per_pixel else 0) + len(checkpoint_uri)
            + outputs.ROW_OVERHEAD)


def read_shard(batch: dict, source) -> dict:
    import ray

    source = ray.get(source) if isinstance(source, ray.ObjectRef) else source
    return source.read(int(batch["start"][0]), int(batch["end"][0]))


class ScoreShards(ModelActor):
    """A Ray Data actor: loads the model once, then scores whole shards in batches."""

    def __init__(self, checkpoint: bytes, manifest: Manifest, batch_size: int, gpu: bool, cpus: float):
        super().__init__(checkpoint, manifest.dtype, batch_size, gpu, cpus)
        self.manifest = manifest

    def __call__(self, batch: dict) -> dict:
        m, n = self.manifest, len(batch["id"])
        out = {"id": batch["id"], "label": batch["label"], "log_prob": np.zeros(n), "likely_class": np.full(n, -1),
               outputs.STARTED: np.full(n, time.time())}
        if m.per_pixel:
            out["nll_map"] = np.zeros((n, *m.shape[1:]), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            part = slice(start, start + self.batch_size)
            # Copied: Ray Data's batches are read-only, which torch.from_numpy warns of.
            levels = torch.tensor(batch["image"][part], device=self.device)
            labels = torch.tensor(batch["label"][part], device=self.device) if m.labels == "own" else None
            result = score(self.model, levels, labels, label_probs=m.label_probs, per_pixel=m.per_pixel)
            out["log_prob"][part] = result["log_prob"].cpu().numpy()
            if "likely_class" in result:
                out["likely_class"][part] = result["likely_class"].cpu().numpy()
            if m.per_pixel:
                out["nll_map"][part] = result["nll_map"].float().cpu().numpy()
        return out


def encode_rows(batch: dict, manifest: Manifest, source):
    """Scores -> rows in SCORE_SCHEMA (sources, heat map PNGs): a CPU task of its own."""
    import ray

    source = ray.get(source) if isinstance(source, ray.ObjectRef) else source
    sources, rows = source.identify(batch["id"])
    labels = [None if v < 0 else int(v) for v in batch["label"]]
    table = score_table(
        batch["id"], sources, rows, labels, batch["log_prob"], shape=manifest.shape,
        likely_class=batch["likely_class"] if manifest.labels == "marginal" else None,
        nll_maps=batch["nll_map"] if manifest.per_pixel else None,
        dtype=manifest.dtype, checkpoint=manifest.checkpoint, model_sha256=manifest.model_sha256,
    )
    return outputs.pass_started(batch, table)


# --- the data: your own images or a torchvision dataset, numbered 0..N-1 --------------------------


@dataclasses.dataclass
class OwnImages:
    """Your own images, read and decoded by ``pixelcnn.images.read_range`` in the read tasks."""

    source: object  # pixelcnn.images.ImageSource
    s3: object
    options: ImageOptions
    split: str
    positions: np.ndarray | None  # with --split train/test: the positions of that split, in order

    @property
    def fingerprint(self) -> str:
        return self.source.fingerprint

    def __len__(self) -> int:
        return len(self.source) if self.positions is None else len(self.positions)

    def read(self, start: int, end: int) -> dict:
        fs = self.s3.filesystem() if self.s3 else open_storage(self.source.root).fs
        if self.positions is None:
            rows = read_range(self.source, fs, start, end, self.options)
            ids = rows.index
        else:  # ids number the split's images; read the span of positions they cover, keep those
            wanted = self.positions[start:end]
            rows = read_range(self.source, fs, int(wanted[0]), int(wanted[-1]) + 1, self.options)
            keep = np.isin(rows.index, wanted)
            rows.images, rows.labels, rows.index = rows.images[keep], rows.labels[keep], rows.index[keep]
            ids = start + np.searchsorted(wanted, rows.index)
        return {"id": ids.astype(np.int64), "image": rows.images, "label": rows.labels}

    def identify(self, ids: np.ndarray) -> tuple[list[str], list[int | None]]:
        positions = np.asarray(ids) if self.positions is None else self.positions[np.asarray(ids)]
        files = np.searchsorted(self.source.offsets, positions, side="right") - 1
        sources = [self.source.uri_of(int(f)) for f in files]
        if self.source.kind == "folder":
            return sources, [None] * len(ids)
        return sources, [int(p - self.source.offsets[f]) for p, f in zip(positions, files)]


@dataclasses.dataclass
class TorchvisionImages:
    """A torchvision dataset, loaded once by the driver and sliced by the read tasks."""

    name: str
    images: object  # ObjectRef of uint8 [N, C, H, W]
    labels: object  # ObjectRef of int64 [N]
    count: int
    parts: list[tuple[str, int]]  # (split, its images) in the order they are numbered
    fingerprint: str

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, end: int) -> dict:
        import ray

        images, labels = ray.get(self.images), ray.get(self.labels)
        return {"id": np.arange(start, end, dtype=np.int64), "image": images[start:end], "label": labels[start:end]}

    def identify(self, ids: np.ndarray) -> tuple[list[str], list[int]]:
        sources, rows = [], []
        for k in np.asarray(ids):
            offset = 0
            for split, count in self.parts:
                if k < offset + count:
                    sources.append(f"{self.name}:{split}")
                    rows.append(int(k - offset))
                    break
                offset += count
        return sources, rows


def open_source(request: ScoreRequest, manifest: Manifest):
    """The images to score, checked against the model before any actor starts."""
    import ray

    shape = tuple(manifest.shape)
    if not request.own_images:
        splits = ["train", "test"] if request.split == "all" else [request.split]
        data = [load_dataset(request.dataset, os.path.abspath(request.data_dir), train=s == "train",
                             download=request.download) for s in splits]
        images = np.concatenate([d.images.numpy() for d in data])
        if tuple(images.shape[1:]) != shape:
            raise DataError(f"{request.dataset} images are {list(images.shape[1:])} (C, H, W); the model takes "
                            f"{list(shape)}")
        digest = hashlib.sha256(f"{request.dataset}:{[len(d) for d in data]}".encode()).hexdigest()
        return TorchvisionImages(request.dataset, ray.put(images), ray.put(np.concatenate([d.labels.numpy() for d in data])),
                                 len(images), [(s, len(d)) for s, d in zip(splits, data)], digest)
    options = ImageOptions(image_size=tuple(shape[1:]) if request.resize else None,
                           channels=shape[0] if request.resize else None, image_column=request.image_column,
                           label_column=request.label_column, skip_bad_images=request.skip_bad_images,
                           background=request.background,
                           test_fraction=request.test_fraction if request.split != "all" else 0)
    source, s3 = find_source(request.dataset, request.s3_endpoint, options)
    found = scan(source, s3, options)
    found.check(source, test_fraction=options.test_fraction, needs_test=False)
    if found.bad:
        print(f"skipped {found.bad} images that do not decode (--skip-bad-images), e.g. {', '.join(found.bad_keys[:3])}",
              flush=True)
    if found.shape != shape:
        key, mode, size = found.shapes[found.shape]
        raise DataError(f"the model takes images {list(shape)} (C, H, W), and {key} is {size[0]}x{size[1]} {mode}: "
                        "pass --resize to resize and convert them")
    if manifest.labels == "own" and not source.has_labels:
        raise DataError(f"--use-labels/--label-column: {request.dataset} has no labels")
    positions = None
    if request.split != "all":
        keys = [source.key(f, r) for f in range(len(source.files)) for r in range(source.counts[f])]
        test = in_test_split(keys, request.test_fraction)
        positions = np.flatnonzero(test if request.split == "test" else ~test)
        if not len(positions):
            raise DataError(f"the {request.split} split of {request.dataset} is empty (--test-fraction {request.test_fraction})")
    return OwnImages(source, s3, options, request.split, positions)


# --- refusals, resources, and what is read back at the end --------------------------------------


def parse_args(argv=None) -> ScoreRequest:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(p, ScoreRequest)
    return options_of(ScoreRequest, p.parse_args(argv), p)


def read_bits(output: Storage, done: list) -> np.ndarray:
    if not done:
        return np.zeros(0)
    files = [output.file(name) for _, _, name in done]
    return pads.dataset(files, filesystem=output.fs, format="parquet").to_table(columns=["bits_per_dim"]) \
        .column("bits_per_dim").to_numpy()


def summarise(bits: np.ndarray, todo: int, times: dict, output: Storage, done: list, source) -> dict:
    stats = {f"p{q}": round(float(np.percentile(bits, q)), 4) for q in (1, 5, 50, 95, 99)} if len(bits) else {}
    summary = {"images": todo, "seconds": times["seconds"], "images_per_s": times["per_s"],
               "startup_seconds": times["startup_seconds"], "pipeline_seconds": times["pipeline_seconds"],
               "pipeline_images_per_s": times["pipeline_per_s"],
               "total_rows": int(len(bits)), "files": len(done), "output": output.uri,
               "bits_per_dim_mean": round(float(bits.mean()), 6) if len(bits) else None, **stats}
    print(f"scored {todo} images in {outputs.timing_text(times, 'images')}; {output.uri} holds "
          f"{len(bits)} rows of {len(source)} images in {len(done)} files", flush=True)
    if len(bits):
        print(f"bits/dim: mean {bits.mean():.4f}, median {np.median(bits):.4f}, 1% {stats['p1']}, 5% {stats['p5']}, "
              f"95% {stats['p95']}, 99% {stats['p99']}", flush=True)
    return summary


def write_report(output: Storage, done: list, source, count: int) -> None:
    """_report.png: the ``count`` least and most likely images (read again from the source) and a histogram."""
    files = [output.file(name) for _, _, name in done]
    table = pads.dataset(files, filesystem=output.fs, format="parquet").to_table(columns=["id", "bits_per_dim"])
    order = np.argsort(table.column("bits_per_dim").to_numpy(), kind="stable")
    ids, bits = table.column("id").to_numpy(), table.column("bits_per_dim").to_numpy()
    picked = {"most likely": order[:count], "least likely": order[::-1][:count]}
    images = {}
    for name, rows in picked.items():
        got = [source.read(int(ids[r]), int(ids[r]) + 1) for r in rows]
        images[name] = (np.concatenate([g["image"] for g in got]), bits[rows])
    output.write(REPORT, score_report_png(images, bits))


if __name__ == "__main__":
    main()
