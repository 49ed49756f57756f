"""Train a PixelCNN with Ray Train: data-parallel (DDP) workers, checkpoints on local disk or S3.

    ray job submit --working-dir . -- python jobs/train.py --storage s3://bucket/runs --name mnist ...
    python jobs/train.py ...          # no cluster: starts an in-process Ray, storage ./runs

Rerunning with the same --storage and --name resumes from the latest checkpoint (a finished run is
not retrained). The run folder <storage>/<name> holds model.pt (the latest model, what
`pixelcnn.load_model` and `jobs/generate.py --checkpoint <storage>/<name>` read), metrics.jsonl,
config.json, samples_epoch_NNN.png, and Ray Train's own checkpoint_* folders. The last line printed is
the final metrics as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch  # noqa: E402

from jobs.common import ArgumentParser, JobError, Storage, check_bucket, check_writable, fail, init_ray, interrupted, open_storage, root_cause, shutdown_ray  # noqa: E402
from pixelcnn.checkpoint import MODEL_FILE, load_checkpoint  # noqa: E402
from pixelcnn.data import DATASETS, DataError, load_dataset  # noqa: E402
from pixelcnn.models import NORMS  # noqa: E402
from pixelcnn.training import AMP_MODES, MODELS, SCHEDULES, Runtime, TrainConfig, train  # noqa: E402

# Flags that define what is trained: a rerun of --name must keep them (others, such as --epochs or
# --lr, may change to extend a run).
RUN_IDENTITY = (
    "dataset", "subset", "model", "hidden", "blocks", "norm", "layers", "kernel_size", "conditional", "batch_size",
    "seed",
)


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    d = TrainConfig()
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="training data")
    data.add_argument("--data-dir", default="./data", help="torchvision root holding e.g. MNIST/raw (on every node)")
    data.add_argument("--download", action="store_true", help="let torchvision download missing data")
    data.add_argument("--subset", type=int, help="train on the first N training images only")
    data.add_argument("--test-subset", type=int, help="evaluate on the first N test images only (default: all)")
    model = p.add_argument_group("model")
    model.add_argument("--model", choices=sorted(MODELS), default=d.model, help="architecture")
    model.add_argument("--hidden", type=int, default=d.hidden, help="h: pixelcnn blocks map 2h -> h -> h -> 2h; gated: channels of each stack")
    model.add_argument("--blocks", type=int, default=d.blocks, help="pixelcnn: number of residual blocks")
    model.add_argument("--norm", choices=NORMS, default=d.norm, help="pixelcnn: normalisation in blocks (batch leaks the future in training)")
    model.add_argument("--layers", type=int, default=d.layers, help="gated: number of gated layers")
    model.add_argument("--kernel-size", type=int, default=d.kernel_size, help="gated: odd k; vertical kernels (k//2+1) x k, horizontal 1 x (k//2+1)")
    model.add_argument("--dropout", type=float, default=d.dropout, help="gated: dropout rate on the gated features in training")
    model.add_argument("--conditional", action="store_true", help="condition on the dataset's class labels")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training data")
    opt.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total (the schedule still spans --epochs)")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split evenly across workers")
    opt.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate (for the global batch)")
    opt.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="cosine: anneal to ~0 at the last step of --epochs; constant: apply --lr-decay per epoch")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up over the first N steps")
    opt.add_argument("--lr-decay", type=float, default=d.lr_decay, help="--schedule constant: multiply the learning rate by this every epoch")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    opt.add_argument("--ema", type=float, default=d.ema, help="decay of the weights' moving average that is evaluated and saved as the model (0: off)")
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    opt.add_argument("--seed", type=int, default=d.seed, help="weights init, data order and sample grids")
    opt.add_argument("--amp", choices=AMP_MODES, default=d.amp, help="bf16 autocast (for GPUs)")
    opt.add_argument("--compile", action="store_true", help="torch.compile the model (after DDP wrapping)")
    run = p.add_argument_group("run")
    run.add_argument("--storage", default="./runs", help="local folder or s3://bucket/prefix for the run folder")
    run.add_argument("--name", help="run name; rerunning a name resumes it (default: <dataset>-<model>-h<hidden>-b<blocks>, gated: ...-l<layers>-k<kernel-size>)")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="also checkpoint every N steps (0: per epoch only)")
    run.add_argument("--log-every", type=int, default=d.log_every, help="print training loss every N steps")
    run.add_argument("--grid-samples", type=int, default=d.grid_samples, help="images in each epoch's sample grid (0: none)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="Ray Train checkpoints to keep")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--num-workers", type=int, default=1, help="DDP workers (one per GPU with --use-gpu)")
    cluster.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL; else CPU workers, gloo")
    cluster.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default: the cluster's CPUs / workers, at most 8)")
    cluster.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the latest checkpoint before giving up")
    cluster.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an in-process Ray)")
    cluster.add_argument("--wait-for-resources", action="store_true", help="wait for an autoscaler instead of failing when the cluster is too small")
    cluster.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    if args.num_workers < 1 or args.max_failures < 0 or args.keep_checkpoints < 1:
        p.error("--num-workers and --keep-checkpoints must be >= 1, --max-failures >= 0")
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        p.error(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    try:
        cfg = TrainConfig(
            dataset=args.dataset, data_dir=args.data_dir, download=args.download, subset=args.subset,
            test_subset=args.test_subset, model=args.model, hidden=args.hidden, blocks=args.blocks, norm=args.norm,
            layers=args.layers, kernel_size=args.kernel_size, dropout=args.dropout,
            conditional=args.conditional, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
            lr=args.lr, schedule=args.schedule, warmup_steps=args.warmup_steps, lr_decay=args.lr_decay,
            weight_decay=args.weight_decay, ema=args.ema, grad_clip=args.grad_clip, seed=args.seed, amp=args.amp,
            compile=args.compile, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
            grid_samples=args.grid_samples,
        )
    except ValueError as error:
        p.error(str(error))
    if cfg.batch_size % args.num_workers:
        p.error(f"--batch-size {cfg.batch_size} must be divisible by --num-workers {args.num_workers}")
    # Ray Train workers run in a folder of their own: resolve against the driver's (the job's working dir).
    cfg.data_dir = os.path.abspath(cfg.data_dir)
    size = f"l{cfg.layers}-k{cfg.kernel_size}" if cfg.model == "gated" else f"b{cfg.blocks}"
    args.name = args.name or f"{cfg.dataset}-{cfg.model}-h{cfg.hidden}-{size}"
    if args.name in (".", "..") or "/" in args.name or "\\" in args.name:  # the run folder is <storage>/<name>
        p.error(f"--name must be one folder name (no '/', not '.' or '..'), got {args.name!r}")
    return cfg, args


class RayTrainRuntime(Runtime):
    """The training loop's view of Ray Train: rank, device, DDP, all-reduce, checkpoints."""

    def __init__(self, run: Storage):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run = run

    @staticmethod
    def log(message: str, flush: bool = True) -> None:
        # Ray Train patches print() in workers to a logger *and* stdout, doubling every line.
        sys.stdout.write(message + "\n")
        sys.stdout.flush()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # Ray touchpoint: DDP wrap (gloo on CPU, NCCL on GPU)

    def all_reduce_sum(self, values):
        if self.world_size > 1:
            torch.distributed.all_reduce(values)
        return values

    def resume_state(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # Ray touchpoint: latest reported checkpoint, after any failure
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(folder)  # weights only; a corrupt file is one CheckpointError line

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
        history = checkpoint["training"]["history"]
        self.run.write("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history).encode())
        self.run.write(MODEL_FILE, buffer.getvalue())
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, MODEL_FILE), "wb") as f:
                f.write(buffer.getvalue())
            # Ray touchpoint: persists the folder to <storage>/<name>/checkpoint_<step>, kept per CheckpointConfig.
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"checkpoint_{metrics['step']:09d}",
            )


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    run = config["run"]
    train(TrainConfig.from_dict(config["train"]), RayTrainRuntime(run))


def check_run_config(run: Storage, cfg: TrainConfig, reported: bool) -> dict | None:
    """A rerun of --name must not contradict what the stored run was trained with. A config.json of a
    run that never ``reported`` (no metrics) is from one that stopped before its first report: it
    binds nothing."""
    stored = run.read("config.json")
    if stored is None or not reported:
        return None
    try:
        stored = json.loads(stored)
    except ValueError:
        raise JobError(f"{run.uri}/config.json is not valid JSON") from None
    new = cfg.to_dict()
    # A flag added after the run was stored had its default then (say --layers, for a pixelcnn run).
    then = {**TrainConfig().to_dict(), **stored}
    changed = [f"--{k.replace('_', '-')} {then[k]} -> {new[k]}" for k in RUN_IDENTITY if then[k] != new[k]]
    if changed:
        raise JobError(f"run {run.uri} was started with other settings ({'; '.join(changed)}): use another --name")
    return stored


def already_trained(previous: dict, cfg: TrainConfig) -> bool:
    """Whether the run's last report is as far as ``cfg`` asks (whole epochs, or --max-steps): then a
    rerun trains nothing, rather than start Ray to find so and record a shorter length in config.json."""
    return previous["epoch"] >= cfg.epochs or (cfg.max_steps is not None and previous["step"] >= cfg.max_steps)


def last_metrics(run: Storage) -> dict | None:
    lines = (run.read("metrics.jsonl") or b"").decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def check_cluster(args) -> float:
    """Fail fast when the cluster cannot hold the workers (Ray would wait forever); CPUs per worker."""
    import ray

    have = ray.cluster_resources()
    cpus = args.cpus_per_worker
    if cpus is None:
        cpus = max(1, min(8, int(have.get("CPU", 1) // args.num_workers)))
    need = {"CPU": cpus * args.num_workers}
    if args.use_gpu:
        need["GPU"] = args.num_workers
    short = [f"{n:g} {k} (cluster has {have.get(k, 0):g})" for k, n in need.items() if have.get(k, 0) < n]
    if short and not args.wait_for_resources:
        raise JobError(
            f"--num-workers {args.num_workers} needs {', '.join(short)}: lower --num-workers/--cpus-per-worker, "
            "or pass --wait-for-resources on an autoscaling cluster"
        )
    return cpus


def main(argv=None) -> dict:
    cfg, args = parse_args(argv)
    try:
        storage = open_storage(args.storage, args.s3_endpoint)
        run = storage.child(args.name)
        # Fail fast, before any worker starts: data, storage, the run's stored config. With --download
        # the driver fetches the data here, once: a failed download is one error line, not a worker
        # failure retried --max-failures times (workers on other nodes still fetch their own copy).
        load_dataset(cfg.dataset, cfg.data_dir, train=False, subset=1, download=cfg.download)
        check_bucket(storage)  # reading only: the write probe waits until the run is going to write
        previous = last_metrics(run)
        stored = check_run_config(run, cfg, reported=previous is not None)
        if stored and already_trained(previous, cfg):
            print(f"run {run.uri} already trained to step {previous['step']} ({previous['epoch']} epochs), "
                  "as far as --epochs/--max-steps ask: nothing to train", flush=True)
            print(json.dumps(previous), flush=True)
            return previous
        init_ray(args.address)
        cpus = check_cluster(args)
        check_writable(storage)
        run.write("config.json", json.dumps(cfg.to_dict(), indent=1).encode())

        import ray.train
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(  # Ray touchpoint: the DDP worker group
            train_worker,
            train_loop_config={"train": cfg.to_dict(), "run": run},
            scaling_config=ray.train.ScalingConfig(
                num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker={"CPU": cpus},
            ),
            run_config=ray.train.RunConfig(
                # Same name + storage => Ray Train restores the latest checkpoint (driver restarts too).
                name=args.name,
                storage_path=storage.path,
                storage_filesystem=storage.fs,
                failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=args.keep_checkpoints),
            ),
        )
        try:
            trainer.fit()
        except SystemExit:  # Ray Train's own Ctrl-C handler aborts the run, then exits from inside fit()
            interrupted()
    except (JobError, DataError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        interrupted()
    except Exception as error:  # a worker's error, re-raised by fit(): one line, not a wall of traces
        fail(f"training failed: {root_cause(error)}")
    finally:
        shutdown_ray()
    final = last_metrics(run)
    print(json.dumps(final), flush=True)  # the last line: final metrics as JSON
    return final


if __name__ == "__main__":
    main()
