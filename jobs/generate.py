"""Generate samples in bulk with Ray Data: PNG images plus metadata as Parquet, exactly once, resumable.

    ray job submit --working-dir . -- python jobs/generate.py --checkpoint s3://bucket/runs/mnist \\
        --num-samples 1000000 --output s3://bucket/samples/mnist --num-actors 8 --gpus-per-actor 1

The pipeline (the Ray touchpoints are marked below):

    shards of missing ids --from_items--> map_batches(SampleShards, ActorPoolStrategy) --> AtomicParquetSink

Ids 0..N-1 are cut into shards of --rows-per-file ids; each shard becomes one Parquet file
``part-<first id>-<last id>.parquet``. Each actor loads the model once and runs the autoregressive
sampler over its shard in batches of --batch-size. Image k depends only on (checkpoint, seed, k,
temperature, labels, dtype, sampler), so batch size, actor count and retries never change it.

Exactly once: every file is written whole under a temporary name and renamed (an S3 PUT is atomic
already), so a visible part file is always complete. A rerun reads the ids already present and
generates only the missing ones; a retried shard rewrites the same file name with the same rows.
``_manifest.json`` records what the output holds (checkpoint hash, seed, temperature, labels, dtype,
sampler), and a rerun that changes any of them is refused. Files other than the
part files start with ``_`` (``_manifest.json``, ``_preview.png``), which Parquet readers skip, so the
whole folder reads as one dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from jobs.common import ArgumentParser, JobError, Storage, check_bucket, check_writable, fail, init_ray, interrupted, one_line, open_storage, root_cause, shutdown_ray  # noqa: E402
from pixelcnn.checkpoint import MODEL_FILE, CheckpointError, load_checkpoint, model_from_checkpoint  # noqa: E402
from pixelcnn.sampling import SAMPLERS, labels_for_ids, sample  # noqa: E402
from pixelcnn.schema import SAMPLE_SCHEMA, decode_png, grid_png, sample_table  # noqa: E402

MANIFEST = "_manifest.json"
PREVIEW = "_preview.png"
PART_PREFIX = "part-"
WRITE_CPUS = 0.25  # per Parquet write task (encoding and upload of one shard's file)
# What determines the images: an output folder holds rows of exactly one such setting. The sampler is
# part of it: the samplers sum in different orders, so their draws part where one lands within rounding
# of a CDF boundary, rarely in float32 but in most bfloat16 images.
IDENTITY = ("model_sha256", "seed", "temperature", "label_probs", "dtype", "sampler")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model: a run folder or checkpoint (folder or .pt), local or s3://")
    p.add_argument("--num-samples", type=int, required=True, help="generate ids 0..N-1")
    p.add_argument("--output", required=True, help="local folder or s3://bucket/prefix for the Parquet files")
    p.add_argument("--seed", type=int, default=0, help="image k depends only on (checkpoint, seed, k, temperature, label, dtype, sampler)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (< 1: sharper, > 1: more diverse)")
    p.add_argument("--sampler", choices=SAMPLERS, default="cached",
                   help="cached (fast), naive, or fused (PixelCNN on GPU actors: one Triton kernel per pixel step); "
                        "all draw the same images, up to float rounding at CDF boundaries")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision the model samples in: bfloat16 is faster on GPUs (tensor cores, half the bytes); "
                        "its draws differ from float32's where one lands near a CDF boundary, so its images differ, "
                        "and log_prob is the bfloat16 model's")
    p.add_argument("--batch-size", type=int,
                   help="images sampled together on one actor (default: 4096 for the cached and fused samplers on GPU actors, else 256)")
    p.add_argument("--rows-per-file", type=int, default=10000, help="ids per Parquet file (one actor task each)")
    p.add_argument("--num-actors", type=int, default=1, help="sampler actors (fixed pool size; at most one per shard left to write)")
    p.add_argument("--min-actors", type=int, help="autoscaling pool: at least this many actors")
    p.add_argument("--max-actors", type=int, help="autoscaling pool: at most this many actors (and no more than the shards left to write)")
    p.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs per actor; 0 runs CPU actors")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs per actor (default: 1 with GPUs, else the cluster's CPUs / actors, leaving room for writes)")
    p.add_argument("--label", type=int, help="conditional models: the class of every sample")
    p.add_argument("--label-probs", help="conditional models: comma-separated class probabilities drawn per sample (default: uniform)")
    p.add_argument("--preview", type=int, default=0, help="also write _preview.png, a contact sheet of the first N samples (a finished rerun keeps an existing one)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an in-process Ray)")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="wait for an autoscaler instead of failing when the cluster lacks the actors' GPUs or CPUs")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    if args.batch_size is None:
        # On a GPU the cached sampler is bound by kernel launches, not arithmetic, so samples/s grows
        # almost linearly with the batch up to thousands (benchmarks/sampling.py: 467/s at 256, 3,242/s
        # at 4096 on an H100, 2.4 GB of device memory for the reference model). The naive sampler is
        # compute-bound from ~256 and would only take more memory. The fused kernel's rate grows with
        # the batch too, until every SM has a tile of 16 images (~2,000 on an H100).
        args.batch_size = 4096 if args.gpus_per_actor > 0 and args.sampler != "naive" else 256
    for name in ("num_samples", "batch_size", "rows_per_file", "num_actors"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not -2**63 <= args.seed < 2**63:  # the random streams hash it as a 64-bit integer
        p.error(f"--seed must be between -2**63 and 2**63 - 1, got {args.seed}")
    if not 0 < args.temperature < math.inf:
        p.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not 0 <= args.gpus_per_actor < math.inf or args.preview < 0:  # (NaN fails a comparison)
        p.error("--gpus-per-actor and --preview must be >= 0")
    if args.cpus_per_actor is not None and not 0 < args.cpus_per_actor < math.inf:
        p.error(f"--cpus-per-actor must be > 0, got {args.cpus_per_actor}")
    if args.sampler == "fused" and not args.gpus_per_actor:
        p.error("--sampler fused runs on GPU actors: pass --gpus-per-actor")
    if (args.min_actors is None) != (args.max_actors is None):
        p.error("--min-actors and --max-actors go together")
    if args.min_actors is not None and not 1 <= args.min_actors <= args.max_actors:
        p.error("need 1 <= --min-actors <= --max-actors")
    if args.label is not None and args.label_probs is not None:
        p.error("pass --label or --label-probs, not both")
    return args


# --- the model and the request ------------------------------------------------------------------


def read_checkpoint(uri: str, endpoint: str | None) -> tuple[str, bytes]:
    """The checkpoint's bytes from a run folder, checkpoint folder or .pt file, local or on S3."""
    storage = open_storage(uri, endpoint)
    candidates = [] if storage.path.endswith(".pt") else [(storage, MODEL_FILE)]  # a run or checkpoint folder
    if "/" in storage.path.strip("/"):  # or the checkpoint file itself, whatever its name
        parent, name = storage.uri.rsplit("/", 1)
        candidates.append((open_storage(parent, endpoint), name))
    try:
        for folder, name in candidates:
            data = folder.read(name)
            if data is not None:
                return f"{folder.uri}/{name}", data
    except OSError as error:
        raise JobError(f"cannot read checkpoint {storage.uri}: {one_line(error)}") from None
    raise JobError(f"checkpoint not found: {storage.uri} (neither a checkpoint file nor a folder holding {MODEL_FILE})")


def label_probs(args, num_classes: int) -> list[float] | None:
    """Per-sample class distribution for conditional models (None: unconditional)."""
    if not num_classes:
        if args.label is not None or args.label_probs is not None:
            raise JobError("--label/--label-probs given, but the checkpoint's model is unconditional")
        return None
    if args.label is not None:
        if not 0 <= args.label < num_classes:
            raise JobError(f"--label {args.label} is not a class of this model (0..{num_classes - 1})")
        return [float(k == args.label) for k in range(num_classes)]
    if args.label_probs is None:
        return [1.0 / num_classes] * num_classes
    try:
        probs = [float(v) for v in args.label_probs.split(",")]
    except ValueError:
        raise JobError(f"--label-probs must be comma-separated numbers, got {args.label_probs!r}") from None
    if len(probs) != num_classes or not all(0 <= p < math.inf for p in probs) or sum(probs) <= 0:  # NaN fails too
        raise JobError(f"--label-probs needs {num_classes} finite non-negative numbers with a positive sum")
    return [p / sum(probs) for p in probs]


# --- what the output already holds -------------------------------------------------------------


def part_files(output: Storage) -> list[str]:
    return sorted(
        info.path for info in output.list()
        if info.type == pa.fs.FileType.File and info.base_name.startswith(PART_PREFIX)
        and info.base_name.endswith(".parquet")
    )


def existing_ids(output: Storage) -> np.ndarray:
    files = part_files(output)
    if not files:
        return np.zeros(0, dtype=np.int64)
    table = pads.dataset(files, filesystem=output.fs, format="parquet").to_table(columns=["id"])
    ids = table.column("id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise JobError(f"{output.uri} holds duplicate ids: it was not written by this job alone")
    return ids


def plan_shards(num_samples: int, done: np.ndarray, rows_per_file: int) -> list[tuple[int, int]]:
    """Half-open id ranges still to generate: the gaps in ``done``, cut at multiples of rows_per_file."""
    missing = np.ones(num_samples, dtype=bool)
    missing[done[done < num_samples]] = False
    shards = []
    for start in range(0, num_samples, rows_per_file):
        block = missing[start:start + rows_per_file]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], block.astype(np.int8), [0]])))
        shards += [(start + int(a), start + int(b)) for a, b in zip(edges[::2], edges[1::2])]
    return shards


def check_manifest(output: Storage, manifest: dict) -> None:
    """Refuse an output that holds samples of another request (or of something else)."""
    stored, files = output.read(MANIFEST), part_files(output)
    if stored is None:
        if files:
            raise JobError(f"{output.uri} holds part files but no {MANIFEST}: not an output of this job")
        return
    stored = json.loads(stored)
    if "dtype" not in stored:  # its part files lack the dtype column: new ones would not read as one dataset
        raise JobError(f"{output.uri} was written by an older generate.py (no dtype column): use another --output")
    if "sampler" not in stored:  # a manifest from before the sampler was part of it: its rows say which
        stored["sampler"] = manifest["sampler"]  # (none yet: any may start them)
        if files:
            rows = pads.dataset(files, filesystem=output.fs, format="parquet").to_table(columns=["sampler"])
            stored["sampler"] = "+".join(sorted(set(rows.column("sampler").to_pylist())))  # "a+b" matches none
    changed = [k for k in IDENTITY if stored.get(k) != manifest[k]]
    if changed:
        what = ', '.join(f'{k} {stored.get(k)!r} -> {manifest[k]!r}' for k in changed)
        if not files:  # claimed by a request that wrote no rows: it failed, or is starting now
            raise JobError(f"{output.uri} is claimed by another request ({what}) that has written no rows yet: "
                           f"if none is running, delete {MANIFEST} there; or use another --output")
        raise JobError(f"{output.uri} holds samples of another request ({what}): use another --output")


def claim_output(output: Storage, manifest: dict) -> None:
    """Create the manifest once the request is known to run (so a refused one leaves the output
    untouched), unless one exists, then check the one that stands. Creating is exclusive, so of two
    requests that both found a fresh output one creates it and the other, if it differs, stops here."""
    try:
        output.create(MANIFEST, json.dumps(manifest, indent=1).encode())
    except OSError as error:  # on S3 a conditional PUT through boto3, which finds credentials its own way
        raise JobError(f"cannot write to {output.uri}: {one_line(error)}") from None
    check_manifest(output, manifest)


# --- Ray Data: the sampler actors and the atomic Parquet sink -----------------------------------


class SampleShards:
    """A Ray Data actor: loads the model once, then samples whole shards of ids."""

    def __init__(self, checkpoint: bytes, settings: dict):
        self.device = torch.device("cuda" if settings["gpus_per_actor"] > 0 else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(settings["cpus_per_actor"])))
        dtype = getattr(torch, settings["dtype"])
        self.model = model_from_checkpoint(load_checkpoint(checkpoint)).to(self.device, dtype)
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        s = self.settings
        tables = []
        for start, end in zip(batch["start"], batch["end"]):
            ids = np.arange(start, end, dtype=np.int64)
            labels = None if s["label_probs"] is None else labels_for_ids(s["seed"], ids, s["label_probs"])
            out = sample(
                self.model, ids=ids, seed=s["seed"], temperature=s["temperature"], sampler=s["sampler"],
                batch_size=s["batch_size"], labels=labels,
            )
            tables.append(sample_table(
                ids, out.images, out.log_prob, labels, seed=s["seed"], temperature=s["temperature"],
                sampler=s["sampler"], dtype=s["dtype"], checkpoint=s["checkpoint"], model_sha256=s["model_sha256"],
            ))
        return pa.concat_tables(tables)


def make_sink(output: Storage):
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class AtomicParquetSink(Datasink):
        """One Parquet file per block, named by its first and last id, never visible half-written."""

        def write(self, blocks, ctx) -> int:
            # A write task may run on any node: a local --output must be a folder they all share.
            if not output.s3 and output.read(MANIFEST) is None:
                raise JobError(f"{output.uri} on node {socket.gethostname()} lacks the driver's {MANIFEST}: a local "
                               "--output must be a folder every node shares (or use s3://)")
            rows = 0
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                if not table.num_rows:
                    continue
                ids = table.column("id").to_numpy()
                buffer = pa.BufferOutputStream()
                pq.write_table(table.cast(SAMPLE_SCHEMA), buffer)
                output.write(f"{PART_PREFIX}{ids.min():012d}-{ids.max():012d}.parquet", buffer.getvalue().to_pybytes())
                rows += table.num_rows
            return rows

    return AtomicParquetSink()


# --- the job -----------------------------------------------------------------------------------


def write_preview(output: Storage, count: int) -> None:
    """A contact sheet of the first ``count`` ids, read back from the written Parquet."""
    files = part_files(output)
    table = pads.dataset(files, filesystem=output.fs, format="parquet").to_table(
        columns=["id", "image_png"], filter=pads.field("id") < count,
    ).sort_by("id")
    images = torch.stack([torch.from_numpy(decode_png(png.as_py())) for png in table.column("image_png")])
    output.write(PREVIEW, grid_png(images))


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        # Fail fast, before any actor starts: checkpoint, labels, output, what the output holds.
        checkpoint_uri, checkpoint = read_checkpoint(args.checkpoint, args.s3_endpoint)
        ckpt = load_checkpoint(checkpoint, name=checkpoint_uri)
        model_from_checkpoint(ckpt, source=f"checkpoint {checkpoint_uri}")  # weights must match the config
        cfg = ckpt["model_config"]
        if args.sampler == "fused" and ckpt["model_class"] != "PixelCNN":
            raise JobError(f"--sampler fused samples PixelCNN only; this checkpoint holds a {ckpt['model_class']}")
        probs = label_probs(args, cfg.get("num_classes", 0))
        output = open_storage(args.output, args.s3_endpoint)
        check_bucket(output)  # reading only: a request refused below leaves the output as it was
        manifest = {
            "checkpoint": checkpoint_uri, "model_sha256": hashlib.sha256(checkpoint).hexdigest(),
            "seed": args.seed, "temperature": args.temperature, "label_probs": probs, "dtype": args.dtype,
            "sampler": args.sampler, "data_shape": ckpt["data_shape"], "rows_per_file": args.rows_per_file,
        }
        check_manifest(output, manifest)
        shards = plan_shards(args.num_samples, existing_ids(output), args.rows_per_file)
        todo = sum(end - start for start, end in shards)
        started = time.perf_counter()
        if todo:
            run_pipeline(args, output, checkpoint, manifest, shards)
        seconds = time.perf_counter() - started
        total, files = len(existing_ids(output)), len(part_files(output))
        if args.preview and (todo or output.read(PREVIEW) is None):  # a finished rerun writes nothing
            write_preview(output, min(args.preview, args.num_samples))
    except (JobError, CheckpointError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        interrupted()
    except Exception as error:  # an actor's or the sink's error, re-raised by Ray Data: one line
        fail(f"generation failed: {root_cause(error)}")
    finally:
        shutdown_ray()
    summary = {
        "samples": todo, "seconds": round(seconds, 3), "samples_per_s": round(todo / seconds, 2) if todo else 0.0,
        "total_rows": total, "files": files, "output": output.uri,
    }
    print(
        f"generated {todo} samples in {seconds:.1f} s ({summary['samples_per_s']:.1f} samples/s); "
        f"{output.uri} holds {total} rows in {files} files",
        flush=True,
    )
    print(json.dumps(summary), flush=True)
    return summary


def run_pipeline(args, output: Storage, checkpoint: bytes, manifest: dict, shards: list) -> None:
    import ray

    init_ray(args.address)
    # No more actors than shards: an idle one would only start up, and hold its GPU, for nothing.
    num_actors = min(args.num_actors, len(shards))
    min_actors = None if args.min_actors is None else min(args.min_actors, len(shards))
    max_actors = None if args.max_actors is None else min(args.max_actors, len(shards))
    have = ray.cluster_resources()
    # The actors leave CPU for two write tasks at a time: with none left the files would wait for the
    # pool to finish (the whole request held in memory, nothing on disk if it crashes), and a pool
    # that takes every CPU can hang.
    writes = 2 * WRITE_CPUS
    cpus = args.cpus_per_actor
    if cpus is None:
        cpus = 1.0 if args.gpus_per_actor else max(0.25, (have.get("CPU", 1) - writes) / (max_actors or num_actors))
    actors = min_actors or num_actors
    for resource, need, users in (("GPU", args.gpus_per_actor * actors, "the sampler actors"),
                                  ("CPU", cpus * actors + writes, "the sampler actors and their Parquet writes")):
        if need > have.get(resource, 0) and not args.wait_for_resources:  # else the pool waits for ever
            raise JobError(f"{need:g} {resource}s needed for {users}, the cluster has {have.get(resource, 0):g}: "
                           "fewer --num-actors or --cpus-per-actor, or --wait-for-resources on an autoscaling cluster")
    check_writable(output)
    claim_output(output, manifest)
    settings = {
        "seed": args.seed, "temperature": args.temperature, "sampler": args.sampler, "dtype": args.dtype,
        "batch_size": args.batch_size, "label_probs": manifest["label_probs"], "checkpoint": manifest["checkpoint"],
        "model_sha256": manifest["model_sha256"], "gpus_per_actor": args.gpus_per_actor, "cpus_per_actor": cpus,
    }
    pool = (
        ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors)
        if min_actors is not None else ray.data.ActorPoolStrategy(size=num_actors)
    )
    items = [{"start": start, "end": end} for start, end in shards]
    # Ray touchpoints: one input row per shard; each actor call samples one shard (-> one file).
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        SampleShards,
        batch_size=1,
        compute=pool,
        num_gpus=args.gpus_per_actor,
        num_cpus=cpus,
        fn_constructor_kwargs={"checkpoint": checkpoint, "settings": settings},
    )
    # Write tasks take a fraction of a CPU: a whole one (Ray's default) would not fit in what the actors
    # leave, and every file would wait until the last shard was sampled.
    dataset.write_datasink(make_sink(output), ray_remote_args={"num_cpus": WRITE_CPUS})


if __name__ == "__main__":
    main()
