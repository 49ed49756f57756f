"""Train a PixelCNN with Ray Train: data-parallel (DDP) workers, checkpoints on local disk or S3.

    ray job submit --working-dir . -- python jobs/train.py --storage s3://bucket/runs --name mnist ...
    python jobs/train.py ...          # no cluster: starts an in-process Ray, storage ./runs

Rerunning with the same --storage and --name resumes from the latest checkpoint (a finished run is
not retrained). The run folder <storage>/<name> holds model.pt (the latest model, what
`pixelcnn.load_model` and `jobs/generate.py --checkpoint <storage>/<name>` read), metrics.jsonl (a
line per report), curve.jsonl (a line per --log-every window and evaluation), metrics.png, config.json,
samples_epoch_NNN.png, and Ray Train's own checkpoint_* folders. The last
line printed is the final metrics as JSON. docs/training.md has the whole story.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import pyarrow.fs as pafs  # noqa: E402
import torch  # noqa: E402

from jobs.cli import ArgumentParser, ClusterOptions, add_options, options_of  # noqa: E402
from jobs.cluster import init_ray, log_level, one_error_line, quiet_ray_logs  # noqa: E402
from jobs.datasets import READ_CPUS, find_source, gather, read_images, scan  # noqa: E402
from jobs.errors import JobError, Terminated  # noqa: E402
from jobs.storage import Storage, check_bucket, check_writable, open_storage  # noqa: E402
from pixelcnn.batches import Batch, InMemoryBatches, load_split  # noqa: E402
from pixelcnn.checkpoint import MODEL_FILE, load_checkpoint  # noqa: E402
from pixelcnn.config import TrainConfig  # noqa: E402
from pixelcnn.data import ImageData  # noqa: E402
from pixelcnn.errors import CheckpointError, DataError  # noqa: E402
from pixelcnn.images import class_count  # noqa: E402
from pixelcnn.options import flag_name, identity_changes, option  # noqa: E402
from pixelcnn.sampling.streams import derive_seed  # noqa: E402
from pixelcnn.training import Runtime, train  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainJob(ClusterOptions):
    """The job's own flags (the recipe's are TrainConfig's): where the run lives, and the cluster."""

    storage: str = option("./runs", "local folder or s3://bucket/prefix for the run folder", group="run")
    name: str | None = option(None, "run name; rerunning a name resumes it (default: <dataset>-<model>-h<hidden>-b<blocks>, "
                              "gated: ...-l<layers>-k<kernel-size>)", group="run")
    keep_checkpoints: int = option(2, "Ray Train checkpoints to keep", group="run")
    num_workers: int = option(1, "DDP workers (one per GPU with --use-gpu); with --min-workers, the most", group="cluster")
    min_workers: int | None = option(None, "elastic training: keep training with as few as this many workers when "
                                     "nodes go, and grow back to --num-workers when they return", group="cluster")
    resize_interval: float = option(60.0, "elastic training: seconds between checks for room to grow", group="cluster")
    use_gpu: bool = option(False, "one GPU per worker, NCCL; else CPU workers, gloo", group="cluster")
    cpus_per_worker: float | None = option(None, "CPUs per worker (default: the cluster's CPUs / workers, at most 8)",
                                           group="cluster")
    max_failures: int = option(3, "worker-group restarts from the latest checkpoint before giving up", group="cluster")
    data_in_memory_gb: float = option(2.0, "your own images: a dataset whose decoded images fit in this many GiB is "
                                      "held in memory on every worker (exact batches); a larger one streams through "
                                      "Ray Data (0: always stream)", group="data")

    def __post_init__(self):
        if self.num_workers < 1 or self.max_failures < 0 or self.keep_checkpoints < 1:
            raise ValueError("--num-workers and --keep-checkpoints must be >= 1, --max-failures >= 0")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"--min-workers must be between 1 and --num-workers {self.num_workers}, got {self.min_workers}")
        for name in ("cpus_per_worker", "resize_interval"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{flag_name(name)} must be > 0, got {value}")
        if not 0 <= self.data_in_memory_gb < math.inf:
            raise ValueError(f"--data-in-memory-gb must be >= 0, got {self.data_in_memory_gb}")
        if self.name is not None and (self.name in (".", "..") or "/" in self.name or "\\" in self.name):
            raise ValueError(f"--name must be one folder name (no '/', not '.' or '..'), got {self.name!r}")


def main(argv=None) -> dict:
    cfg, job = parse_args(argv)
    with one_error_line("training", job.s3_endpoint):
        storage = open_storage(job.storage, job.s3_endpoint)
        run = storage.child(job.name)
        cfg, previous = refuse_or_resume(cfg, job, run)
        if previous is not None:
            return previous
        sources = list_data(cfg, job)  # your own images: listed here, before Ray starts
        init_ray(job.address)
        cfg, datasets, in_memory = prepare_data(cfg, job, sources)
        cpus = check_cluster(job, streamed=not in_memory)
        check_fingerprint(run, cfg)
        if cfg.max_time is not None and cfg.schedule_steps is None:
            cfg = dataclasses.replace(cfg, schedule_steps=measure_steps(cfg, job, cpus))
        check_writable(run)
        run.write("config.json", json.dumps(cfg.to_dict(), indent=1).encode())
        fit(cfg, job, storage, cpus, datasets, in_memory)
    final = last_metrics(run)
    print(json.dumps(final), flush=True)  # the last line: final metrics as JSON
    return final


def fit(cfg: TrainConfig, job: TrainJob, storage: Storage, cpus: float, datasets: dict, in_memory: bool) -> None:
    """The Ray Train run: a DDP worker group (elastic between --min-workers and --num-workers), the data
    through Ray Data, checkpoints in <storage>/<name>."""
    import ray.train
    from ray.train.torch import TorchTrainer

    workers = job.num_workers if job.min_workers is None else (job.min_workers, job.num_workers)
    trainer = TorchTrainer(  # Ray touchpoint: the DDP worker group
        train_worker,
        train_loop_config={"train": cfg.to_dict(), "run": storage.child(job.name), "in_memory": in_memory,
                           "log_level": log_level()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=job.use_gpu, resources_per_worker={"CPU": cpus},
            elastic_resize_monitor_interval_s=job.resize_interval,
        ),
        # Ray touchpoint: your own images reach the workers as Ray Datasets. Data held in memory is given
        # whole to every worker (each takes its exact share of every batch); streamed data is split.
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if in_memory else ["train"]),
        run_config=ray.train.RunConfig(
            # Same name + storage => Ray Train restores the latest checkpoint (driver restarts too).
            name=job.name, storage_path=storage.path, storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=log_level()),
        ),
    )
    # SIGTERM (`ray job stop`, Kubernetes) takes Ctrl-C's way out: Ray Train's own SIGINT handler aborts
    # the run and then exits from inside fit(); an exception raised in fit() instead leaves its controller
    # running, and Ray's shutdown waits for it.
    terminated = []
    signal.signal(signal.SIGTERM, lambda signum, frame: (terminated.append(signum), os.kill(os.getpid(), signal.SIGINT)))
    try:
        trainer.fit()
    except SystemExit:
        raise (Terminated() if terminated else KeyboardInterrupt()) from None


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    # Ray Train sets its workers' root logger to INFO, where it logs every report (with its metrics) again.
    logging.getLogger().setLevel(config["log_level"])
    quiet_ray_logs(config["log_level"])  # a dataset this worker reads
    train(TrainConfig.from_dict(config["train"]), RayTrainRuntime(config["run"], config["in_memory"]))


class RayTrainRuntime(Runtime):
    """The training loop's view of Ray Train: rank, device, data, DDP, all-reduce, checkpoints."""

    def __init__(self, run: Storage, in_memory: bool):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run = run
        self.in_memory = in_memory

    @staticmethod
    def log(message: str, flush: bool = True) -> None:
        # Ray Train patches print() in workers to a logger *and* stdout, doubling every line.
        sys.stdout.write(message + "\n")
        sys.stdout.flush()

    def load_data(self, cfg: TrainConfig):
        if not cfg.own_images:  # torchvision's datasets: every worker reads its own copy, in memory
            return super().load_data(cfg)
        import ray.train

        test = as_image_data(gather(ray.train.get_dataset_shard("test")), cfg)  # Ray touchpoint
        shard = ray.train.get_dataset_shard("train")  # Ray touchpoint: the whole dataset, or this worker's split
        if self.in_memory:
            data = as_image_data(gather(shard), cfg, subset=cfg.subset)
            batches = InMemoryBatches(data, cfg.batch_size, cfg.seed, self.rank, self.world_size, self.device)
        else:
            batches = StreamedBatches(shard, cfg, self.rank, self.world_size, self.device)
        batches.num_classes = cfg.dataset_classes
        return batches, test

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # Ray touchpoint: DDP wrap (gloo on CPU, NCCL on GPU)

    def all_reduce_sum(self, values):
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
        return values

    def resume_state(self):
        """The newest intact checkpoint: Ray Train's latest registered one, or the run folder's model.pt,
        which is written just before each report, so it is newer when the driver died between the upload
        of a checkpoint and its registration."""
        import ray.train

        candidates = []
        checkpoint = ray.train.get_checkpoint()  # Ray touchpoint: latest reported checkpoint, after any failure
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                candidates.append(load_checkpoint(folder))  # weights only; a corrupt file is one CheckpointError line
        data = self.run.read(MODEL_FILE)
        if data is not None:
            try:
                candidates.append(load_checkpoint(data, name=f"{self.run.uri}/{MODEL_FILE}"))
            except CheckpointError:
                pass  # a corrupt run-folder copy: Ray Train's own checkpoint stands
        return max(candidates, key=lambda c: c["step"], default=None)

    def publish(self, metrics, checkpoint, files):
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)  # every rank reports the same number of times (a barrier)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        # Run-root copies for people and for jobs/generate.py first (each write atomic): if the worker
        # dies after them, Ray Train resumes from its previous checkpoint and writes them again, whereas
        # a report that succeeded before them could leave them stale for good.
        for name, data in files.items():
            self.run.write(name, data)
        self.run.write(MODEL_FILE, buffer.getvalue())
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, MODEL_FILE), "wb") as f:
                f.write(buffer.getvalue())
            # Ray touchpoint: persists the folder to <storage>/<name>/checkpoint_<step>, kept per CheckpointConfig.
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"checkpoint_{metrics['step']:09d}",
            )


class StreamedBatches:
    """Batches streamed from this worker's split of a Ray Dataset too large to hold in memory: the
    training loop's ``pixelcnn.batches.Batches``, as ``InMemoryBatches`` is for data in memory.

    Ray Data splits the data into equal shares (``streaming_split(equal=True)``, at most one image per
    worker dropped) and streams each worker's share in an order that varies per epoch (block order and a
    local shuffle). Every global batch holds ``--batch-size`` images, each worker's exact share of it,
    weighted as with data in memory, and an epoch is as many whole global batches as every share can
    fill, so no image is trained on twice in an epoch. What is not exact, unlike data in memory: which
    images form a batch depends on Ray Data's scheduling (so on the worker count), and a run resumed
    mid-epoch restarts that epoch's stream and skips as many batches as it had trained, not the same
    images.
    """

    def __init__(self, shard, cfg: TrainConfig, rank: int, world_size: int, device):
        self.shard, self.cfg, self.rank, self.world_size, self.device = shard, cfg, rank, world_size, device
        b = cfg.batch_size
        self.share = (rank + 1) * b // world_size - rank * b // world_size
        per_worker = cfg.dataset_train_images // world_size
        self.steps_per_epoch = per_worker // -(-b // world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"--batch-size {b} exceeds what {world_size} workers' shares of the data can fill")
        self.shape = cfg.dataset_shape

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        rows = self.shard.iter_torch_batches(
            batch_size=self.share, drop_last=True, local_shuffle_buffer_size=4 * self.share,
            local_shuffle_seed=derive_seed(self.cfg.seed, 3, epoch, self.rank), device=self.device,
        )
        for step, batch in enumerate(rows):
            if step >= self.steps_per_epoch:
                continue  # drain the share: every worker ends its epoch's stream together
            if step >= start:
                yield Batch(batch["image"], batch["label"].clamp(min=0), self.cfg.batch_size)


def as_image_data(arrays: dict, cfg: TrainConfig, subset: int | None = None) -> ImageData:
    images, labels = torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["label"]).clamp(min=0)
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    return ImageData(images.contiguous(), labels, cfg.dataset_classes)


# --- before the run: refusals, what the run folder holds, the data --------------------------------


def parse_args(argv=None) -> tuple[TrainConfig, TrainJob]:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(p, TrainConfig)
    add_options(p, TrainJob)
    args = p.parse_args(argv)
    cfg = options_of(TrainConfig, args, p)
    job = options_of(TrainJob, args, p)
    if cfg.batch_size < job.num_workers:
        p.error(f"--batch-size {cfg.batch_size} is smaller than --num-workers {job.num_workers}: a worker would get no images")
    if not cfg.own_images:  # Ray Train workers run in a folder of their own: resolve against the driver's
        cfg.data_dir = os.path.abspath(cfg.data_dir)
    if job.name is None:
        size = {"gated": f"l{cfg.layers}-k{cfg.kernel_size}", "pixelcnnpp": f"r{cfg.nr_resnet}-m{cfg.nr_logistic_mix}"
                }.get(cfg.model, f"b{cfg.blocks}")
        base = cfg.dataset if not cfg.own_images else re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.dataset.rstrip("/").rsplit("/", 1)[-1]) or "images"
        job = dataclasses.replace(job, name=f"{base}-{cfg.model}-h{cfg.hidden}-{size}")
    return cfg, job


def measure_steps(cfg: TrainConfig, job: TrainJob, cpus: float) -> int:
    """The steps --max-time buys, measured before training by a Ray task on a worker's resources (its CPUs,
    or a GPU): fixed in config.json, so a resume or another worker count trains the same ones."""
    import ray

    from pixelcnn.training import budget_line, largest_share, steps_in

    share = largest_share(cfg, job.num_workers)
    measure = ray.remote(steps_in).options(num_cpus=cpus, num_gpus=1 if job.use_gpu else 0)  # Ray touchpoint
    steps, per_step = ray.get(measure.remote(cfg, share, "cuda" if job.use_gpu else "cpu"))
    print(budget_line(cfg, steps, per_step, share), flush=True)
    return steps


def refuse_or_resume(cfg: TrainConfig, job: TrainJob, run: Storage) -> tuple[TrainConfig, dict | None]:
    """Fail fast, before any worker starts, on what the run folder or the data refuse. (``cfg`` with the
    steps a resumed run's --max-time bought, the last metrics when the run is already as long as asked:
    then nothing trains.)"""
    if not cfg.own_images:
        # With --download the driver fetches the data here, once: a failed download is one error line,
        # not a worker failure retried --max-failures times. --subset must fit the data.
        load_split(cfg, train=True)
        load_split(cfg, train=False)
    check_bucket(run)  # reading only: the write probe waits until the run is going to write
    previous = last_metrics(run)
    stored = check_run_config(run, cfg, reported=previous is not None)
    if stored and cfg.max_time is not None:  # the steps measured when the run started (--max-time is the same)
        cfg = dataclasses.replace(cfg, schedule_steps=stored.get("schedule_steps"))
    if stored and already_trained(previous, cfg):
        restore_model(run)
        print(f"run {run.uri} already trained to step {previous['step']} ({previous['epoch']} epochs), "
              "as far as --epochs/--max-steps/--max-time ask: nothing to train", flush=True)
        print(json.dumps(previous), flush=True)
        return cfg, previous
    return cfg, None


def check_run_config(run: Storage, cfg: TrainConfig, reported: bool) -> dict | None:
    """A rerun of --name must not contradict what the stored run was trained with. A config.json of a
    run that never ``reported`` (no metrics) is from one that stopped before its first report: it
    binds nothing. The data's fingerprint is checked once the driver has listed the data."""
    stored = run.read("config.json")
    if stored is None or not reported:
        return None
    try:
        stored = json.loads(stored)
    except ValueError:
        raise JobError(f"{run.uri}/config.json is not valid JSON") from None
    # A flag added after the run was stored had its default then (say --layers, for a pixelcnn run).
    then = {**json.loads(json.dumps(TrainConfig().to_dict())), **stored}
    changed = [f"{flag_name(k)} {old} -> {new}" for k, old, new in identity_changes(cfg, then)]
    if changed:
        raise JobError(f"run {run.uri} was started with other settings ({'; '.join(changed)}): use another --name")
    return stored


def check_fingerprint(run: Storage, cfg: TrainConfig) -> None:
    """Your own images: a rerun of --name must read the data the run was trained on (same files, sizes
    and row counts), not other data under the same URI."""
    stored = run.read("config.json")
    if stored is None or last_metrics(run) is None:
        return
    then = json.loads(stored).get("dataset_fingerprint")
    if then is not None and then != cfg.dataset_fingerprint:
        raise JobError(f"run {run.uri} was trained on other data under {cfg.dataset} (fingerprint {then[:12]} -> "
                       f"{(cfg.dataset_fingerprint or '')[:12]}: files added, removed or changed): use another --name")


def already_trained(previous: dict, cfg: TrainConfig) -> bool:
    """Whether the run's last report is as far as ``cfg`` asks (whole epochs, or --max-steps): then a
    rerun trains nothing, rather than start Ray to find so and record a shorter length in config.json."""
    if cfg.max_steps is not None and previous["step"] >= cfg.max_steps:
        return True
    if cfg.schedule_steps is not None:  # --max-time: the steps it bought, whatever --epochs says
        return previous["step"] >= cfg.schedule_steps
    return previous["epoch"] >= cfg.epochs


def restore_model(run: Storage) -> None:
    """A finished run's model.pt must load: a corrupt one is replaced by the newest intact
    checkpoint_*/model.pt of the run (whole files, written before each report), or named in one line."""
    name = f"{run.uri}/{MODEL_FILE}"
    try:
        load_checkpoint(run.read(MODEL_FILE) or b"", name=name)
        return
    except CheckpointError as error:
        broken = str(error)
    folders = sorted((info.base_name for info in run.list()
                      if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")), reverse=True)
    for folder in folders:
        data = run.read(f"{folder}/{MODEL_FILE}")
        try:
            load_checkpoint(data or b"", name=folder)
        except CheckpointError:
            continue
        run.write(MODEL_FILE, data)
        print(f"{name} was unusable ({broken}): restored it from {folder}/{MODEL_FILE}", flush=True)
        return
    raise JobError(f"{broken}, and the run holds no intact checkpoint_*/{MODEL_FILE} to restore it from")


def last_metrics(run: Storage) -> dict | None:
    lines = (run.read("metrics.jsonl") or b"").decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def check_cluster(job: TrainJob, streamed: bool = False) -> float:
    """Fail fast when the cluster cannot hold the workers (Ray would wait forever); CPUs per worker.
    Elastic runs need room for --min-workers only. Streamed data leaves room for two read tasks."""
    import ray

    have = ray.cluster_resources()
    workers = job.min_workers or job.num_workers
    reads = 2 * READ_CPUS if streamed else 0
    cpus = job.cpus_per_worker
    if cpus is None:
        cpus = max(1, min(8, int((have.get("CPU", 1) - reads) // workers)))
        if streamed and cpus * workers + reads > have.get("CPU", 1):  # a small machine: half a CPU each
            cpus = 0.5
    need = {"CPU": cpus * workers + reads}
    if job.use_gpu:
        need["GPU"] = workers
    short = [f"{n:g} {k} (cluster has {have.get(k, 0):g})" for k, n in need.items() if have.get(k, 0) < n]
    if short and not job.wait_for_resources:
        which = "--min-workers" if job.min_workers else "--num-workers"
        raise JobError(
            f"{which} {workers} needs {', '.join(short)}: lower {which}/--cpus-per-worker, "
            "or pass --wait-for-resources on an autoscaling cluster"
        )
    return cpus


def list_data(cfg: TrainConfig, job: TrainJob) -> dict:
    """Your own images: the listings of the training and test data, and their read options (an empty or
    missing folder, a Parquet file without the image column and the like are refused here)."""
    if not cfg.own_images:
        return {}
    options = cfg.image_options(test_fraction=0 if cfg.test_dataset else None)
    sources = {"train": (*find_source(cfg.dataset, job.s3_endpoint, options), options)}
    if cfg.test_dataset:
        test_options = cfg.image_options(test_fraction=0)
        sources["test"] = (*find_source(cfg.test_dataset, job.s3_endpoint, test_options), test_options)
    return sources


def prepare_data(cfg: TrainConfig, job: TrainJob, sources: dict) -> tuple[TrainConfig, dict, bool]:
    """Your own images: scan them (Ray Data tasks), refuse what cannot be trained on, record what the data
    is in the config, and build the Ray Datasets the workers read. (cfg, datasets, in memory)."""
    if not cfg.own_images:
        return cfg, {}, True
    source, s3, options = sources["train"]
    found = scan(source, s3, options)
    found.check(source, test_fraction=options.test_fraction, needs_test=not cfg.test_dataset)
    train_images = found.images - found.test
    test_source, test_s3, test_options = source, s3, options
    fingerprint = source.fingerprint
    if cfg.test_dataset:
        test_source, test_s3, test_options = sources["test"]
        test_found = scan(test_source, test_s3, test_options)
        test_found.check(test_source, test_fraction=0, needs_test=False)
        if test_found.shape != found.shape:
            raise DataError(f"--test-dataset images are {test_found.shape} (C, H, W), the training images {found.shape}")
        fingerprint = f"{fingerprint}+{test_source.fingerprint}"
    if found.bad:
        print(f"skipped {found.bad} images that do not decode (--skip-bad-images), e.g. {', '.join(found.bad_keys[:3])}",
              flush=True)
    classes = len(source.classes) if source.file_labels is not None else found.num_classes
    if cfg.conditional and not classes:
        raise DataError(f"--conditional needs labels, and {cfg.dataset} has none (no class subfolders or label column)")
    if cfg.conditional and source.file_labels is None:  # a label column: its values are the model's classes
        classes = class_count(found.labels, cfg.dataset)
    in_memory = train_images * math.prod(found.shape) <= job.data_in_memory_gb * 2**30
    if cfg.subset is not None:
        if not in_memory:
            raise JobError("--subset applies to data held in memory: raise --data-in-memory-gb, or leave --subset out")
        if cfg.subset > train_images:
            raise DataError(f"--subset {cfg.subset} is more than the {train_images} training images of {cfg.dataset}")
    if cfg.batch_size > (cfg.subset or train_images):
        raise DataError(f"--batch-size {cfg.batch_size} exceeds the {cfg.subset or train_images} training images")
    cfg = dataclasses.replace(cfg, dataset_fingerprint=fingerprint, dataset_shape=found.shape, dataset_classes=classes,
                              dataset_train_images=train_images)
    train_data = read_images(source, s3, options, split="train")
    test_data = read_images(test_source, test_s3, test_options, split=None if cfg.test_dataset else "test")
    if in_memory:
        train_data = train_data.materialize()  # decoded once, in the object store, read by every worker
    else:
        train_data = train_data.randomize_block_order()
    print(f"data: {train_images} training and {found.test if not cfg.test_dataset else test_found.images} test images "
          f"{found.shape} (C, H, W), {classes} classes, {'in memory' if in_memory else 'streamed'}", flush=True)
    return cfg, {"train": train_data, "test": test_data.materialize()}, in_memory


if __name__ == "__main__":
    main()
