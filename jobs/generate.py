"""Generate samples in bulk with Ray Data: PNG images plus metadata as Parquet, exactly once, resumable.

    ray job submit --working-dir . -- python jobs/generate.py --checkpoint s3://bucket/runs/mnist \\
        --num-samples 1000000 --output s3://bucket/samples/mnist --num-actors 8 --gpus-per-actor 1

The pipeline (its Ray touchpoints read top-down in ``run_pipeline``):

    shards of missing ids --from_items--> map_batches(SampleShards, actors) --> map_batches(encode_rows, CPU tasks)
        --> AtomicParquetSink

Ids 0..N-1 are cut into shards of --rows-per-file ids, one Parquet file each. Each actor loads the model
once and samples its shards; it returns raw uint8 images, and CPU tasks beside it encode the PNGs and
build the rows, so a GPU actor only samples. Image k depends only on (checkpoint, seed, k, temperature,
labels, dtype, sampler), so batch size, actor count and retries never change it. The output is written
exactly once and resumes where it stopped (``jobs/outputs.py``). docs/generation.md has the whole story.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
from jobs.errors import JobError  # noqa: E402
from jobs.schema import SAMPLE_SCHEMA, sample_table  # noqa: E402
from jobs.storage import Storage, check_bucket, check_writable, open_storage, read_checkpoint  # noqa: E402
from pixelcnn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from pixelcnn.figures import grid_png  # noqa: E402
from pixelcnn.images import decode_png  # noqa: E402
from pixelcnn.options import option  # noqa: E402
from pixelcnn.sampling import SAMPLERS, labels_for_ids, sample  # noqa: E402
from pixelcnn.sampling.streams import check_seed  # noqa: E402

PREVIEW = "_preview.png"
ENCODE_CPUS = 0.25  # per encode task (PNGs and rows of one shard)
WRITE_CPUS = 0.25  # per Parquet write task


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateRequest(ActorPoolOptions):
    num_samples: int = option(help="generate ids 0..N-1")
    seed: int = option(0, "image k depends only on (checkpoint, seed, k, temperature, label, dtype, sampler)")
    temperature: float = option(1.0, "softmax temperature (< 1: sharper, > 1: more diverse)")
    sampler: str = option("cached", "cached (fast), naive, or fused (PixelCNN on GPU actors: one Triton kernel per "
                          "pixel step); all draw the same images, up to float rounding at CDF boundaries", choices=SAMPLERS)
    dtype: str = option("float32", "precision the model samples in: bfloat16 is faster on GPUs (docs/generation.md)",
                        choices=("float32", "bfloat16"))
    min_actors: int | None = option(None, "autoscaling pool: at least this many actors", group="actors")
    max_actors: int | None = option(None, "autoscaling pool: at most this many actors (and no more than the files left)",
                                    group="actors")
    label: int | None = option(None, "conditional models: the class of every sample")
    label_probs: str | None = option(None, "conditional models: comma-separated class probabilities drawn per sample "
                                     "(default: uniform)")
    preview: int = option(0, "also write _preview.png, a contact sheet of the first N samples")

    def default_batch_size(self) -> int:
        # On a GPU the cached sampler is bound by kernel launches, so samples/s grows almost linearly
        # with the batch up to thousands (docs/benchmarks.md); the naive one is compute-bound from ~256.
        return 4096 if self.gpus_per_actor > 0 and self.sampler != "naive" else 256

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        check_seed(self.seed, "--seed")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"--temperature must be a finite number > 0, got {self.temperature}")
        if self.preview < 0:
            raise ValueError(f"--preview must be >= 0, got {self.preview}")
        if self.sampler == "fused" and not self.gpus_per_actor:
            raise ValueError("--sampler fused runs on GPU actors: pass --gpus-per-actor")
        if (self.min_actors is None) != (self.max_actors is None):
            raise ValueError("--min-actors and --max-actors go together")
        if self.min_actors is not None and not 1 <= self.min_actors <= self.max_actors:
            raise ValueError("need 1 <= --min-actors <= --max-actors")
        if self.label is not None and self.label_probs is not None:
            raise ValueError("pass --label or --label-probs, not both")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What an output holds: its identity fields must match for a rerun to write into it."""

    checkpoint: str  # where the model was read from (another path to the same file is fine)
    model_sha256: str = option(identity=True, help="")
    seed: int = option(identity=True, help="")
    temperature: float = option(identity=True, help="")
    label_probs: list[float] | None = option(identity=True, help="")
    # The sampler is part of it: the samplers sum in different orders, so their draws part where one
    # lands within rounding of a CDF boundary, rarely in float32 but in most bfloat16 images.
    dtype: str = option(identity=True, help="")
    sampler: str = option(identity=True, help="")
    rows_per_file: int = 10000  # the layout: a rerun writes the files of the one the output was started with
    data_shape: list[int] = dataclasses.field(default_factory=list)
    kind: str = "generation"  # which job's output: a scoring job is refused it as such (jobs/outputs.py)


# Ids always start at 0: a second output of the same request would hold the same images.
SPLIT = "split the request into outputs of at most {ids} --num-samples each, each with its own --seed"


def main(argv=None) -> dict:
    request = parse_args(argv)
    with one_error_line("generation", request.s3_endpoint):
        checkpoint_uri, checkpoint, ckpt = read_model(request)
        # A layout no run could finish is refused before anything starts, naming values that would work.
        row_bytes = shard_row_bytes(ckpt["data_shape"], checkpoint_uri)
        outputs.check_rows_per_file(request.rows_per_file, row_bytes)
        outputs.check_files(request.num_samples, request.rows_per_file, row_bytes, SPLIT)
        output = open_storage(request.output, request.s3_endpoint)
        check_bucket(output)  # reading only: a request refused below leaves the output as it was
        manifest = Manifest(
            checkpoint=checkpoint_uri, model_sha256=hashlib.sha256(checkpoint).hexdigest(), seed=request.seed,
            temperature=request.temperature, label_probs=label_probs(request, ckpt["model_config"].get("num_classes", 0)),
            dtype=request.dtype, sampler=request.sampler, rows_per_file=request.rows_per_file,
            data_shape=list(ckpt["data_shape"]),
        )
        manifest, done, shards = outputs.resume(
            output, manifest, request.num_samples, repair_overlaps=request.repair,
            upgrade=upgrade(output, manifest.sampler), row_bytes=row_bytes, split=SPLIT)
        todo = sum(end - start for start, end in shards)
        started = time.time()
        pipeline_started = run_pipeline(request, output, checkpoint, manifest, shards, bool(done)) if todo else None
        times = outputs.timings(todo, started, pipeline_started, time.time())
        done = outputs.part_ranges(output)
        if request.preview and (todo or output.read(PREVIEW) is None):  # a finished rerun writes nothing
            write_preview(output, done, min(request.preview, request.num_samples))
    summary = {
        "samples": todo, "seconds": times["seconds"], "samples_per_s": times["per_s"],
        "startup_seconds": times["startup_seconds"], "pipeline_seconds": times["pipeline_seconds"],
        "pipeline_samples_per_s": times["pipeline_per_s"],
        "total_rows": outputs.rows_held(done), "files": len(done), "output": output.uri,
    }
    print(f"generated {todo} samples in {outputs.timing_text(times, 'samples')}; "
          f"{output.uri} holds {summary['total_rows']} rows in {summary['files']} files", flush=True)
    print(json.dumps(summary), flush=True)
    return summary


def shard_row_bytes(data_shape, checkpoint_uri: str) -> int:
    """What a row of a shard takes in memory, at most: its raw image (an actor's result), its PNG (no
    larger than the raw bytes plus a filter byte per image row and headers) and the other columns."""
    return 2 * math.prod(data_shape) + len(checkpoint_uri) + outputs.ROW_OVERHEAD


def run_pipeline(request: GenerateRequest, output: Storage, checkpoint: bytes, manifest: Manifest, shards: list,
                 has_parts: bool) -> float | None:
    """Sample and write ``shards``; returns when the first shard reached an actor (time.time())."""
    import ray

    init_ray(request.address)
    pool, cpus = actor_pool(request, len(shards))
    check_writable(output)
    with outputs.Lease(output, "generate.py"):
        outputs.claim(output, manifest, has_parts=has_parts, upgrade=upgrade(output, manifest.sampler))
        items = [{"start": start, "end": end} for start, end in shards]
        # Ray touchpoints: one input row per shard; each actor call samples one shard and returns raw images.
        samples = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            SampleShards, batch_size=1, compute=pool, num_gpus=request.gpus_per_actor, num_cpus=cpus,
            fn_constructor_kwargs={"checkpoint": checkpoint, "manifest": manifest, "batch_size": request.batch_size,
                                   "gpu": request.gpus_per_actor > 0, "cpus": cpus},
        )
        # CPU tasks encode the PNGs and build the rows, in parallel beside the actors (which only sample).
        rows = samples.map_batches(encode_rows, batch_size=None, num_cpus=ENCODE_CPUS, fn_kwargs={"manifest": manifest})
        # Write tasks take a fraction of a CPU: a whole one (Ray's default) would not fit in what the actors
        # leave, and every file would wait until the last shard was sampled.
        sink = outputs.make_sink(output, SAMPLE_SCHEMA)
        rows.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
        return sink.started


class SampleShards(ModelActor):
    """A Ray Data actor: loads the model once, then samples whole shards of ids into raw images."""

    def __init__(self, checkpoint: bytes, manifest: Manifest, batch_size: int, gpu: bool, cpus: float):
        super().__init__(checkpoint, manifest.dtype, batch_size, gpu, cpus)
        self.manifest = manifest

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.time()
        m = self.manifest
        ids = np.arange(int(batch["start"][0]), int(batch["end"][0]), dtype=np.int64)
        labels = None if m.label_probs is None else labels_for_ids(m.seed, ids, m.label_probs)
        out = sample(self.model, ids=ids, seed=m.seed, temperature=m.temperature, sampler=m.sampler,
                     batch_size=self.batch_size, labels=labels)
        return {"id": ids, "image": out.images.numpy(), "log_prob": out.log_prob.numpy(),
                "label": np.full(len(ids), -1) if labels is None else labels.numpy(),
                outputs.STARTED: np.full(len(ids), started)}


def encode_rows(batch: dict[str, np.ndarray], manifest: Manifest):
    """Raw samples -> rows in SAMPLE_SCHEMA (PNG encoding): a CPU task of its own."""
    labels = None if manifest.label_probs is None else batch["label"]
    table = sample_table(
        batch["id"], batch["image"], batch["log_prob"], labels,
        seed=manifest.seed, temperature=manifest.temperature, sampler=manifest.sampler, dtype=manifest.dtype,
        checkpoint=manifest.checkpoint, model_sha256=manifest.model_sha256,
    )
    return outputs.pass_started(batch, table)


# --- before the pipeline: the request, the model, what the output holds ---------------------------


def parse_args(argv=None) -> GenerateRequest:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(p, GenerateRequest)
    return options_of(GenerateRequest, p.parse_args(argv), p)


def read_model(request: GenerateRequest) -> tuple[str, bytes, dict]:
    """The checkpoint's URI, bytes and loaded dict; refused if it cannot be used as asked."""
    uri, data = read_checkpoint(request.checkpoint, request.s3_endpoint)
    ckpt = load_checkpoint(data, name=uri)
    model_from_checkpoint(ckpt, source=f"checkpoint {uri}")  # the weights must match the config
    if request.sampler == "fused" and ckpt["model_class"] != "PixelCNN":
        raise JobError(f"--sampler fused samples PixelCNN only; this checkpoint holds a {ckpt['model_class']}")
    return uri, data, ckpt


def label_probs(request: GenerateRequest, num_classes: int) -> list[float] | None:
    """Per-sample class distribution for conditional models (None: unconditional)."""
    if not num_classes:
        if request.label is not None or request.label_probs is not None:
            raise JobError("--label/--label-probs given, but the checkpoint's model is unconditional")
        return None
    if request.label is not None:
        if not 0 <= request.label < num_classes:
            raise JobError(f"--label {request.label} is not a class of this model (0..{num_classes - 1})")
        return [float(k == request.label) for k in range(num_classes)]
    return class_probs(request.label_probs, num_classes)


def upgrade(output: Storage, sampler: str):
    """Fill in what an older generate.py's manifest lacks, or refuse it (the output's part files are listed
    only for such a manifest)."""

    def fill(stored: dict) -> dict:
        if "dtype" not in stored:  # its part files lack the dtype column: new ones would not read as one dataset
            raise JobError(f"{output.uri} was written by an older generate.py (no dtype column): use another --output")
        if "sampler" not in stored:  # from before the sampler was part of it: its rows say which
            stored["sampler"] = sampler  # (none yet: any may start them)
            done = outputs.part_ranges(output)
            if done:
                files = [output.file(name) for _, _, name in done]
                rows = pads.dataset(files, filesystem=output.fs, format="parquet").to_table(columns=["sampler"])
                stored["sampler"] = "+".join(sorted(set(rows.column("sampler").to_pylist())))  # "a+b" matches none
        return stored

    return fill


def actor_pool(request: GenerateRequest, shards: int):
    """The actor pool and CPUs per actor; refused when the cluster cannot hold the actors (the pool
    would wait for ever) unless --wait-for-resources."""
    import ray

    # No more actors than shards: an idle one would only start up, and hold its GPU, for nothing.
    num_actors = min(request.num_actors, shards)
    min_actors = None if request.min_actors is None else min(request.min_actors, shards)
    max_actors = None if request.max_actors is None else min(request.max_actors, shards)
    # Room for two encode and two write tasks at a time beside the actors.
    cpus = actor_cpus(actors=min_actors or num_actors, most=max_actors or num_actors, gpus_per_actor=request.gpus_per_actor,
                      cpus_per_actor=request.cpus_per_actor, others=2 * (ENCODE_CPUS + WRITE_CPUS),
                      wait=request.wait_for_resources, what="sampler")
    pool = (ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors) if min_actors is not None
            else ray.data.ActorPoolStrategy(size=num_actors))
    return pool, cpus


def write_preview(output: Storage, done: list, count: int) -> None:
    """A contact sheet of the first ``count`` ids, read back from the written Parquet."""
    files = [output.file(name) for first, _, name in done if first < count]
    table = pads.dataset(files, filesystem=output.fs, format="parquet").to_table(
        columns=["id", "image_png"], filter=pads.field("id") < count,
    ).sort_by("id")
    images = torch.stack([torch.from_numpy(decode_png(png.as_py())) for png in table.column("image_png")])
    output.write(PREVIEW, grid_png(images))


if __name__ == "__main__":
    main()
