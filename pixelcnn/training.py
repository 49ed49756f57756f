"""The training loop: maximum likelihood (cross-entropy per dimension) with Adam.

Distribution is applied from outside through ``Runtime`` (nanoGPT/torchtitan style): the loop asks it
to wrap the model (DDP), to sum metrics across workers, for a checkpoint to resume from, and to
publish metrics and checkpoints. ``Runtime`` itself is the single-process, local-folder version;
``jobs/train.py`` supplies the Ray Train one.

Data is held in memory as uint8 (small datasets; on a GPU it lives in device memory) and sharded by
index: each epoch a permutation seeded by (seed, epoch) is cut into global batches, and worker r
takes slice r of every global batch. So the shards are disjoint, reshuffled per epoch, and the
global batch (and so the learning rate) means the same at any worker count; resuming at step s
replays the exact batch order from s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import torch

from ._torchvision import import_torchvision
from .checkpoint import MODEL_FILE, checkpoint_dict, save_checkpoint
from .data import DATASET_SHAPES, ImageData, load_dataset
from .likelihood import bits_per_dim, loss_per_dim, model_logits, nll_per_image
from .models import PixelCNN, PixelCNNConfig
from .sampling import sample

MODELS = {"pixelcnn": (PixelCNN, PixelCNNConfig)}
AMP_MODES = ("off", "bf16")


@dataclass
class TrainConfig:
    # data
    dataset: str = "mnist"
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None  # first N training images
    test_subset: int | None = None  # first N test images (None: the whole test set)
    # model
    model: str = "pixelcnn"
    hidden: int = 128
    blocks: int = 15
    norm: str = "none"
    conditional: bool = False
    # optimisation
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps in total
    batch_size: int = 128  # global: split evenly across workers
    lr: float = 1e-3
    lr_decay: float = 1.0  # multiply the learning rate by this after every epoch
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    seed: int = 0
    amp: str = "off"  # "bf16": autocast on GPU
    compile: bool = False
    # reporting
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at the end of each epoch only)
    log_every: int = 20
    eval_batch_size: int = 256
    grid_samples: int = 16  # images in the per-epoch sample grid; 0 disables

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {AMP_MODES}, got {self.amp!r}")
        for name in ("epochs", "batch_size", "hidden", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")

    def model_config(self, data: ImageData | None = None):
        """The model's config for this run's dataset (shape from the data or the dataset table)."""
        channels, height, width, classes = DATASET_SHAPES[self.dataset]
        if data is not None:
            (channels, height, width), classes = data.shape, data.num_classes
        _, config_class = MODELS[self.model]
        return config_class(
            in_channels=channels, image_size=(height, width), hidden=self.hidden, blocks=self.blocks,
            norm=self.norm, num_classes=classes if self.conditional else 0,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class Runtime:
    """Single process, one device, artefacts in a local run folder. Subclass for distribution."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str, device: str | torch.device = "cpu", log=print):
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.log = log

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def resume_state(self) -> dict | None:
        path = os.path.join(self.run_dir, MODEL_FILE)
        if os.path.exists(path):
            return torch.load(path, map_location="cpu", weights_only=True)
        return None

    def publish(self, metrics: dict, checkpoint: dict | None, files: dict[str, bytes]) -> None:
        """Record metrics; on checkpoints also the model and extra files (e.g. sample grid PNGs)."""
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for name, data in files.items():
            with open(os.path.join(self.run_dir, name), "wb") as f:
                f.write(data)
        if checkpoint is not None:
            save_checkpoint(os.path.join(self.run_dir, MODEL_FILE), checkpoint)


def train(cfg: TrainConfig, runtime: Runtime) -> dict:
    """Train (or resume) per ``cfg``; returns the final metrics (with ``test_bits_per_dim``)."""
    log = runtime.log if runtime.rank == 0 else (lambda *a, **k: None)
    device = runtime.device
    train_data = load_dataset(cfg.dataset, cfg.data_dir, train=True, subset=cfg.subset, download=cfg.download)
    test_data = load_dataset(cfg.dataset, cfg.data_dir, train=False, subset=cfg.test_subset, download=cfg.download)
    if cfg.batch_size % runtime.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {runtime.world_size} workers")
    steps_per_epoch = len(train_data) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {len(train_data)} training images")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model_class, _ = MODELS[cfg.model]
    model = model_class(cfg.model_config(train_data)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, history = 0, []
    state = runtime.resume_state()
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["training"]["optimizer"])
        step, history = state["step"], list(state["training"]["history"])
        log(f"resuming from step {step}")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    train_model = runtime.prepare_model(model)
    if cfg.compile:
        train_model = torch.compile(train_model)  # after DDP wrapping, as DDP's docs recommend
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else contextlib.nullcontext()
    )
    # Small datasets live on the device: no loader, no host->device copies in the loop.
    images = train_data.images.to(device)
    labels = train_data.labels.to(device)
    local_batch = cfg.batch_size // runtime.world_size

    def report_metrics(window: list, final: bool) -> dict:
        metrics = {
            "step": step, "epoch": step // steps_per_epoch,
            "lr": optimizer.param_groups[0]["lr"],
            **_reduce_window(window, runtime),
            **_evaluate_sharded(model, test_data, cfg, runtime, autocast),
        }
        if final:
            metrics["done"] = True
        return metrics

    window: list[tuple[float, int, float]] = []  # (loss sum, images, seconds) since the last report
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * cfg.lr_decay**epoch
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        order = order.to(device)
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        while step < epoch_end:
            started = time.perf_counter()
            batch = order[(step % steps_per_epoch) * cfg.batch_size:][: cfg.batch_size]
            batch = batch[runtime.rank * local_batch:(runtime.rank + 1) * local_batch]
            levels, batch_labels = images[batch], labels[batch]
            with autocast:
                loss = loss_per_dim(model_logits(train_model, levels, batch_labels), levels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            window.append((float(loss.detach()) * len(batch), len(batch), time.perf_counter() - started))
            if step % cfg.log_every == 0 or step == epoch_end:
                recent = window[-cfg.log_every:]
                log(
                    f"epoch {epoch + 1} step {step}/{total_steps} "
                    f"loss {sum(w[0] for w in recent) / sum(w[1] for w in recent) / math.log(2):.4f} bits/dim "
                    f"{sum(w[1] for w in recent) * runtime.world_size / sum(w[2] for w in recent):.1f} images/s",
                    flush=True,
                )
            at_epoch_end = step == epoch_end
            if at_epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                metrics = report_metrics(window, step == total_steps)
                window = []
                history.append(metrics)
                files = {}
                if at_epoch_end and cfg.grid_samples and runtime.rank == 0:
                    files[f"samples_epoch_{epoch + 1:03d}.png"] = sample_grid_png(model, cfg.grid_samples, cfg.seed)
                checkpoint = None
                if runtime.rank == 0:
                    training = {"optimizer": optimizer.state_dict(), "history": history, "config": cfg.to_dict()}
                    checkpoint = checkpoint_dict(model, step=step, epoch=epoch, dataset=cfg.dataset, training=training)
                runtime.publish(metrics, checkpoint, files)
                log(json.dumps(metrics), flush=True)
    return history[-1] if history else {"step": step, "done": True}


def _reduce_window(window: list, runtime: Runtime) -> dict:
    """Training loss (bits/dim) and throughput since the last report, summed over all workers."""
    totals = torch.tensor(
        [sum(w[0] for w in window), sum(w[1] for w in window), sum(w[2] for w in window)], dtype=torch.float64,
        device=runtime.device,
    )
    loss_sum, count, seconds = runtime.all_reduce_sum(totals).tolist()
    if not count:
        return {}
    return {
        "train_bits_per_dim": loss_sum / count / math.log(2),
        # each worker's seconds overlap: images/s = images / (mean seconds per worker)
        "images_per_s": count / (seconds / runtime.world_size),
    }


@torch.no_grad()
def _evaluate_sharded(model, data: ImageData, cfg: TrainConfig, runtime: Runtime, autocast) -> dict:
    """Exact test bits/dim: every worker sums NLL over its share of the test set, then all-reduce."""
    model.eval()
    indices = torch.arange(runtime.rank, len(data), runtime.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for start in range(0, len(indices), cfg.eval_batch_size):
        batch = indices[start:start + cfg.eval_batch_size]
        levels = data.images[batch].to(runtime.device)
        with autocast:
            logits = model_logits(model, levels, data.labels[batch].to(runtime.device))
        total[0] += nll_per_image(logits, levels).sum()
        total[1] += len(batch)
    model.train()
    nll, count = runtime.all_reduce_sum(total).tolist()
    return {"test_bits_per_dim": bits_per_dim(nll, int(count), math.prod(data.shape))}


def sample_grid_png(model, count: int, seed: int) -> bytes:
    """A PNG grid of ``count`` samples (via torchvision's ``make_grid``)."""
    import io

    from PIL import Image

    labels = None
    if model.config.num_classes:
        labels = torch.arange(count) % model.config.num_classes
    images = sample(model, count, seed=seed, labels=labels, batch_size=count).images
    grid = import_torchvision().utils.make_grid(images, nrow=int(math.ceil(math.sqrt(count))), pad_value=128)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")  # make_grid gives 3 channels
    return buffer.getvalue()
