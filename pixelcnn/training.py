"""The training loop: maximum likelihood (cross-entropy per dimension) with AdamW, a step-based
learning-rate schedule and an exponential moving average (EMA) of the weights.

Distribution is applied from outside through ``Runtime`` (nanoGPT/torchtitan style): the loop asks it
to wrap the model (DDP), to sum metrics across workers, for a checkpoint to resume from, and to
publish metrics and checkpoints. ``Runtime`` itself is the single-process, local-folder version;
``jobs/train.py`` supplies the Ray Train one.

Data is held in memory as uint8 (small datasets; on a GPU it lives in device memory) and sharded by
index: each epoch a permutation seeded by (seed, epoch) is cut into global batches, and worker r
takes slice r of every global batch. So the shards are disjoint, reshuffled per epoch, and the
global batch (and so the learning rate) means the same at any worker count; resuming at step s
replays the exact batch order from s.

Resuming is exact: the learning rate is a function of the step alone (``learning_rate``), dropout
masks are drawn from a generator seeded by (seed, step, rank), and a checkpoint holds the raw
weights, the EMA weights and the optimizer state; so a run stopped at step k and resumed ends with
the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import torch

from .checkpoint import MODEL_FILE, checkpoint_dict, load_checkpoint, save_checkpoint, write_atomically
from .data import DATASET_SHAPES, ImageData, load_dataset
from .likelihood import bits_per_dim, loss_per_dim, model_logits, nll_per_image
from .models import NORMS, GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig
from .sampling import sample
from .schema import grid_png

MODELS = {"pixelcnn": (PixelCNN, PixelCNNConfig), "gated": (GatedPixelCNN, GatedPixelCNNConfig)}
AMP_MODES = ("off", "bf16")
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    # data
    dataset: str = "mnist"
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None  # first N training images
    test_subset: int | None = None  # first N test images (None: the whole test set)
    # model
    # "pixelcnn" stays the default so that existing runs and their names keep their meaning; "gated"
    # (no blind spot) is the one to train for quality.
    model: str = "pixelcnn"
    hidden: int = 128  # pixelcnn: blocks map 2h -> h -> h -> 2h; gated: channels of each stack
    blocks: int = 15  # pixelcnn only
    norm: str = "none"  # pixelcnn only
    # gated only. 12 layers of 5-wide kernels reach 27 rows up and 26 columns to either side: in a 28x28
    # image every earlier pixel but those 27 columns away (a pixel in the first column does not see the
    # last column above it, and the reverse), which MNIST's blank border makes no loss. With hidden=128
    # that is 8.5M weights (2.2M at 64, the model's own default): the GPU recipe spends them, as EMA and
    # the reported test figure guard against overfitting; on a CPU pass a smaller --hidden.
    layers: int = 12
    kernel_size: int = 5
    # gated only. Off by default: a regulariser to turn on if test NLL rises while train NLL falls
    # (many epochs, small datasets); for a few epochs of MNIST it would only slow the fit.
    dropout: float = 0.0
    conditional: bool = False
    # optimisation
    epochs: int = 1
    # Stop after this many optimizer steps in total. It does not change the schedule (its horizon is
    # epochs x steps per epoch), so a run stopped early and resumed follows the same one.
    max_steps: int | None = None
    batch_size: int = 128  # global: split evenly across workers
    lr: float = 1e-3  # peak learning rate (after warm-up)
    # Cosine annealing to ~0 at the last step: for a fixed budget of steps it usually ends at a lower
    # loss than a constant rate, as the last, small steps average out the gradient noise, and it has
    # no decay factor to tune. "constant" applies lr_decay per epoch.
    schedule: str = "cosine"
    # A short linear warm-up: Adam's first steps are taken on noisy second-moment estimates and can
    # be large enough to saturate the gates (tanh, sigmoid) of a fresh gated model. 100 steps are
    # well under 1% of a multi-epoch GPU run.
    warmup_steps: int = 100
    lr_decay: float = 1.0  # --schedule constant: multiply the learning rate by this after every epoch
    # AdamW's decoupled decay. Off by default, like dropout: a regulariser for when the test NLL
    # starts to rise, not a free gain in likelihood.
    weight_decay: float = 0.0
    # Decay of the exponential moving average of the weights that is evaluated, sampled and saved as
    # the model (0: off). Averaging the last ~1/(1 - ema) steps smooths out Adam's step-to-step noise
    # (PixelCNN++ evaluates such an average too); 0.999 spans ~2 MNIST epochs at batch 128. Both
    # figures are reported (test_bits_per_dim, test_bits_per_dim_raw), so the gain is measured.
    ema: float = 0.999
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
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # NaN would pass every check below
                raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "hidden", "layers", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.lr_decay <= 0:
            raise ValueError(f"--lr-decay must be > 0, got {self.lr_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip must be >= 0 (0: off), got {self.grad_clip}")
        if self.blocks < 0:
            raise ValueError(f"--blocks must be >= 0, got {self.blocks}")
        if self.norm not in NORMS:
            raise ValueError(f"--norm must be one of {NORMS}, got {self.norm!r}")
        if self.kernel_size < 3 or self.kernel_size % 2 != 1:
            raise ValueError(f"--kernel-size must be odd and >= 3, got {self.kernel_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.dropout and self.model != "gated":
            raise ValueError("--dropout applies to --model gated only")
        if not 0 <= self.ema < 1:
            raise ValueError(f"--ema must be in [0, 1) (0: off), got {self.ema}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"--warmup-steps and --weight-decay must be >= 0, got {self.warmup_steps}, {self.weight_decay}")
        if self.schedule == "cosine" and self.lr_decay != 1.0:
            raise ValueError("--lr-decay applies to --schedule constant only")
        for name in ("subset", "test_subset"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.subset is not None and self.subset < self.batch_size:
            raise ValueError(f"--batch-size {self.batch_size} exceeds --subset {self.subset}: not one full batch to train on")
        for name in ("grid_samples", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if abs(self.seed) >= 2**32:  # the per-epoch and per-step seeds derived from it must fit torch's 64 bits
            raise ValueError(f"--seed must be between -{2**32 - 1} and {2**32 - 1}, got {self.seed}")

    def model_config(self, data: ImageData | None = None):
        """The model's config for this run's dataset (shape from the data or the dataset table)."""
        channels, height, width, classes = DATASET_SHAPES[self.dataset]
        if data is not None:
            (channels, height, width), classes = data.shape, data.num_classes
        common = dict(
            in_channels=channels, image_size=(height, width), hidden=self.hidden,
            num_classes=classes if self.conditional else 0,
        )
        if self.model == "gated":
            return GatedPixelCNNConfig(**common, layers=self.layers, kernel_size=self.kernel_size, dropout=self.dropout)
        return PixelCNNConfig(**common, blocks=self.blocks, norm=self.norm)

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
        """The run folder's checkpoint, if any (a corrupt one is a ``CheckpointError``)."""
        path = os.path.join(self.run_dir, MODEL_FILE)
        return load_checkpoint(path) if os.path.exists(path) else None

    def publish(self, metrics: dict, checkpoint: dict | None, files: dict[str, bytes]) -> None:
        """Rank 0's report (``checkpoint`` holds the metrics so far in its history): extra files such as
        sample grid PNGs, ``metrics.jsonl`` and the model, each written whole. ``metrics.jsonl`` is
        rewritten from the history, so a run resumed from its last checkpoint never lists a report twice."""
        if checkpoint is None:
            return
        for name, data in files.items():
            write_atomically(os.path.join(self.run_dir, name), lambda f: f.write(data))
        history = "".join(json.dumps(m) + "\n" for m in checkpoint["training"]["history"]).encode()
        write_atomically(os.path.join(self.run_dir, "metrics.jsonl"), lambda f: f.write(history))
        save_checkpoint(os.path.join(self.run_dir, MODEL_FILE), checkpoint)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), a function of the step alone.

    Linear warm-up over ``warmup_steps``, then "cosine": half a cosine from ``lr`` down to ~0 at the
    last step of ``epochs`` (``max_steps`` only stops early), or "constant": ``lr`` times
    ``lr_decay`` per finished epoch.
    """
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "constant":
        return cfg.lr * warmup * cfg.lr_decay ** (step // steps_per_epoch)
    horizon = cfg.epochs * steps_per_epoch - cfg.warmup_steps
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, horizon)))
    return cfg.lr * warmup * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """An exponential moving average of a model's weights, held in a copy of the model.

    Every worker keeps one and updates it after each optimizer step: DDP keeps the raw weights equal
    on all workers, so the averages are equal too and evaluation can stay sharded. The decay ramps up
    as ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ExponentialMovingAverage with
    num_updates): early on the average follows the fast-moving weights instead of staying near the
    random initialisation. It depends on the step alone, so a resumed run averages exactly the same.
    Buffers (BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step number ``step`` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        for average, buffer in zip(self.model.buffers(), model.buffers()):
            average.copy_(buffer)


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
    # One parameter group, every tensor decayed alike (the masked-out kernel entries get no gradient,
    # so decay only shrinks values that are multiplied by zero anyway): checkpoints of any run, with or
    # without decay, resume into it.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history = 0, []
    state = runtime.resume_state()
    if state is not None:
        training = state["training"]
        # With EMA the checkpoint's model_state is the average; the raw weights the optimizer steps
        # travel in training["raw_state"].
        model.load_state_dict(training.get("raw_state", state["model_state"]))
        optimizer.load_state_dict(training["optimizer"])
        for group in optimizer.param_groups:
            # The stored hyperparameters are the writing run's; this run's flags win (a changed
            # --weight-decay, or a checkpoint of the earlier plain-Adam loop). lr is set every step.
            group.update(optimizer.defaults)
        step, history = state["step"], list(training["history"])
        log(f"resuming from step {step}")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.ema:
        ema = EMA(model, cfg.ema)
        if state is not None and "raw_state" in state["training"]:
            ema.model.load_state_dict(state["model_state"])
    # The weights evaluated, sampled and saved as the model: the average when there is one.
    final_model = ema.model if ema is not None else model
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
        test_bpd = _evaluate_sharded(final_model, test_data, cfg, runtime, autocast)
        metrics = {
            "step": step, "epoch": step // steps_per_epoch,
            "lr": optimizer.param_groups[0]["lr"],
            **_reduce_window(window, runtime),
            "test_bits_per_dim": test_bpd,
            "test_bits_per_dim_raw": _evaluate_sharded(model, test_data, cfg, runtime, autocast) if ema else test_bpd,
        }
        if final:
            metrics["done"] = True
        return metrics

    window: list[tuple[float, int, float]] = []  # (loss sum, images, seconds) since the last report
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        order = order.to(device)
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        while step < epoch_end:
            started = time.perf_counter()
            batch = order[(step % steps_per_epoch) * cfg.batch_size:][: cfg.batch_size]
            batch = batch[runtime.rank * local_batch:(runtime.rank + 1) * local_batch]
            levels, batch_labels = images[batch], labels[batch]
            if cfg.dropout:
                # Masks from (seed, step, rank), not from whatever the global generator went through
                # before: a resumed run draws the same masks as one that never stopped.
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + runtime.rank)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, steps_per_epoch)
            with autocast:
                loss = loss_per_dim(model_logits(train_model, levels, batch_labels), levels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            if ema is not None:
                ema.update(model, step)
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
                    files[f"samples_epoch_{epoch + 1:03d}.png"] = sample_grid_png(final_model, cfg.grid_samples, cfg.seed)
                checkpoint = None
                if runtime.rank == 0:
                    training = {"optimizer": optimizer.state_dict(), "history": history, "config": cfg.to_dict()}
                    if ema is not None:
                        training["raw_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                    checkpoint = checkpoint_dict(
                        final_model, step=step, epoch=step // steps_per_epoch, dataset=cfg.dataset, training=training,
                    )
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
def _evaluate_sharded(model, data: ImageData, cfg: TrainConfig, runtime: Runtime, autocast) -> float:
    """Exact test bits/dim: every worker sums NLL over its share of the test set, then all-reduce."""
    was_training = model.training
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
    model.train(was_training)
    nll, count = runtime.all_reduce_sum(total).tolist()
    return bits_per_dim(nll, int(count), math.prod(data.shape))


def sample_grid_png(model, count: int, seed: int) -> bytes:
    """A PNG grid of ``count`` samples (conditional models: classes in turn)."""
    labels = torch.arange(count) % model.config.num_classes if model.config.num_classes else None
    return grid_png(sample(model, count, seed=seed, labels=labels, batch_size=count).images)
