"""The training loop: maximum likelihood (cross-entropy per dimension) with AdamW, a step-based
learning-rate schedule and an exponential moving average (EMA) of the weights.

Distribution is applied from outside through ``Runtime`` (nanoGPT/torchtitan style): the loop asks it
for the data, to wrap the model (DDP), to sum metrics across workers, for a checkpoint to resume from,
and to publish metrics and checkpoints. ``Runtime`` itself is the single-process, local-folder version;
``jobs/train.py`` supplies the Ray Train one.

What a step computes does not depend on the number of workers. ``--batch-size`` is the global batch;
each worker takes its share of it (shares differ by at most one image) and weights its summed loss by
``workers / global batch``, so the gradient DDP averages is the one-worker gradient of the mean loss
over the global batch. With the data in memory (``InMemoryBatches``) the batches are a function of
(seed, epoch, step) alone: each epoch is a permutation seeded by (seed, epoch), cut into global batches,
the last one short, so every image is trained on once per epoch. A run that changes its worker count
(elastic training, or a resume on another cluster) therefore continues exactly as if it had not.

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
import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Iterator, NamedTuple

import torch

from .checkpoint import MODEL_FILE, checkpoint_dict, load_checkpoint, save_checkpoint
from .data import DATASET_SHAPES, DATASETS, ImageData, load_dataset
from .figures import grid_png, metrics_png
from .files import write_atomically
from .images import ImageOptions, background_option, class_count
from .likelihood import bits_per_dim, distribution_of, model_logits, nll_per_image
from .models import MODELS, NORMS, GatedPixelCNNConfig, PixelCNNConfig, PixelCNNppConfig
from .options import flag_name, option
from .sampling import sample
from .sampling.streams import check_seed, derive_seed

AMP_MODES = ("off", "bf16")
SCHEDULES = ("constant", "cosine")


def image_size(text: str) -> tuple[int, int]:
    """``--image-size`` H or HxW."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"--image-size must be H or HxW, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise ValueError(f"--image-size must be H or HxW, got {text!r}")
    return (parts[0], parts[-1])


@dataclass
class TrainConfig:
    # data
    dataset: str = option("mnist", "mnist, fashion_mnist, cifar10 (torchvision), synthetic (tiny, for tests), or "
                          "a folder, Parquet file/folder/glob of your own images, local or s3://", identity=True,
                          group="data")
    data_dir: str = option("./data", "torchvision root holding e.g. MNIST/raw (on every node)", group="data")
    download: bool = option(False, "let torchvision download missing data", group="data")
    subset: int | None = option(None, "train on the first N training images only", identity=True, group="data")
    test_subset: int | None = option(None, "evaluate on the first N test images only (default: all)", group="data")
    test_dataset: str | None = option(None, "your own images: a separate test set (default: a --test-fraction of "
                                      "--dataset)", identity=True, group="data")
    test_fraction: float = option(0.05, "your own images: the share held out for testing, chosen by a hash of each "
                                  "image's path or row, so it never changes", identity=True, group="data")
    image_size: tuple[int, int] | None = option(None, "your own images: resize (Lanczos) and centre-crop to H or "
                                                "HxW (default: they must share one size)", identity=True,
                                                parse=image_size, metavar="H[xW]", group="data")
    channels: int | None = option(None, "your own images: convert to 1 (L) or 3 (RGB) channels (default: they must "
                                  "share one mode, L or RGB)", identity=True, choices=(1, 3), group="data")
    image_column: str | None = option(None, "Parquet: the column of encoded images (default: image_png, else image)",
                                      identity=True, group="data")
    label_column: str | None = option(None, "Parquet: the integer label column (default: label, if there is one)",
                                      identity=True, group="data")
    skip_bad_images: bool = option(False, "skip files that do not decode (the job says how many) instead of "
                                   "refusing the dataset", group="data")
    background: tuple[int, int, int] | None = background_option(identity=True, group="data")
    # model
    # "pixelcnn" stays the default so that existing runs and their names keep their meaning; "gated"
    # (no blind spot) is the one to train for quality.
    model: str = option("pixelcnn", "architecture", identity=True, choices=tuple(sorted(MODELS)), group="model")
    hidden: int = option(128, "h: pixelcnn blocks map 2h -> h -> h -> 2h; gated: channels of each stack; "
                         "pixelcnnpp: nr_filters", identity=True, group="model")
    blocks: int = option(15, "pixelcnn: number of residual blocks", identity=True, group="model")
    norm: str = option("none", "pixelcnn: normalisation in blocks (batch leaks the future in training)",
                       identity=True, choices=NORMS, group="model")
    # gated only. 12 layers of 5-wide kernels reach 27 rows up and 26 columns to either side: in a 28x28
    # image every earlier pixel but those 27 columns away, which MNIST's blank border makes no loss. With
    # hidden=128 that is 8.5M weights: the GPU recipe spends them; on a CPU pass a smaller --hidden.
    layers: int = option(12, "gated: number of gated layers", identity=True, group="model")
    kernel_size: int = option(5, "gated: odd k; vertical kernels (k//2+1) x k, horizontal 1 x (k//2+1)",
                              identity=True, group="model")
    # gated only. Off by default: a regulariser to turn on if test NLL rises while train NLL falls.
    dropout: float = option(0.0, "gated, pixelcnnpp: dropout rate on the gated features in training", group="model")
    # pixelcnnpp only (the paper's CIFAR-10 values: 5 and 10).
    nr_resnet: int = option(5, "pixelcnnpp: gated ResNet blocks per resolution", identity=True, group="model")
    nr_logistic_mix: int = option(10, "pixelcnnpp: logistics in each pixel's mixture", identity=True, group="model")
    conditional: bool = option(False, "condition on the dataset's class labels", identity=True, group="model")
    # optimisation
    epochs: int = option(1, "passes over the training data", group="optimisation")
    # Stop after this many optimizer steps in total. It does not change the schedule (its horizon is
    # epochs x steps per epoch), so a run stopped early and resumed follows the same one.
    max_steps: int | None = option(None, "stop after this many optimizer steps in total (the schedule still spans "
                                   "--epochs)", group="optimisation")
    batch_size: int = option(128, "global batch, shared out across workers (shares differ by at most one image)",
                             identity=True, group="optimisation")
    lr: float = option(1e-3, "AdamW peak learning rate (for the global batch)", group="optimisation")
    # Cosine annealing to ~0 at the last step: for a fixed budget of steps it usually ends at a lower
    # loss than a constant rate, and it has no decay factor to tune.
    schedule: str = option("cosine", "cosine: anneal to ~0 at the last step of --epochs; constant: apply --lr-decay "
                           "per epoch", choices=SCHEDULES, group="optimisation")
    # A short linear warm-up: Adam's first steps are taken on noisy second-moment estimates and can
    # saturate the gates (tanh, sigmoid) of a fresh gated model.
    # At most a quarter of the schedule's steps: a short run must still reach --lr and anneal from it.
    warmup_steps: int = option(100, "linear learning-rate warm-up over the first N steps (at most a quarter of the "
                               "schedule's steps)", group="optimisation")
    lr_decay: float = option(1.0, "--schedule constant: multiply the learning rate by this every epoch",
                             group="optimisation")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", group="optimisation")
    # Averaging the last ~1/(1 - ema) steps smooths out Adam's step-to-step noise (PixelCNN++ evaluates
    # such an average too); both test figures are reported, so the gain is measured.
    ema: float = option(0.999, "decay of the weights' moving average that is evaluated and saved as the model "
                        "(0: off)", group="optimisation")
    grad_clip: float = option(1.0, "max gradient norm (0: off)", group="optimisation")
    seed: int = option(0, "weights init, data order and sample grids", identity=True, group="optimisation")
    amp: str = option("off", "bf16 autocast (for GPUs)", choices=AMP_MODES, group="optimisation")
    # float64 makes runs of different worker counts agree to ~1e-12 after hundreds of steps, where float32's
    # rounding grows to ~1e-2 (Adam's normalised steps amplify it): how distributed runs are checked.
    precision: str = option("float32", "weights and arithmetic: float64 to check a distributed or elastic run "
                            "against one process (slow)", choices=("float32", "float64"), group="optimisation")
    compile: bool = option(False, "torch.compile the model (after DDP wrapping)", group="optimisation")
    # reporting
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: per epoch only)", group="reporting")
    log_every: int = option(20, "print a progress line and add a point to the training curve every N steps",
                            group="reporting")
    # Evaluating costs a pass over the test set: by default only at reports, where metrics.jsonl needs it.
    eval_every: int = option(0, "also evaluate on the test set every N steps: test points on the curve between "
                             "reports (0: at each report only)", group="reporting")
    eval_batch_size: int = 256
    grid_samples: int = option(16, "images in each epoch's sample grid (0: none)", group="reporting")
    # Set by the job's driver once it has read your own images (not flags): what the data is.
    dataset_fingerprint: str | None = None  # a hash of the listing: names and sizes, or Parquet row counts
    dataset_shape: tuple[int, int, int] | None = None  # (C, H, W)
    dataset_classes: int = 0  # classes of the labels (0: none)
    dataset_train_images: int = 0  # images in the training split

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):  # NaN would pass every check below
                raise ValueError(f"{flag_name(f.name)} must be a finite number, got {value}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{flag_name(f.name)} must be one of {', '.join(map(str, choices))}, "
                                 f"got {getattr(self, f.name)!r}")
        for name in ("epochs", "batch_size", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.lr_decay <= 0:
            raise ValueError(f"--lr-decay must be > 0, got {self.lr_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip must be >= 0 (0: off), got {self.grad_clip}")
        if self.dropout and self.model not in ("gated", "pixelcnnpp"):
            raise ValueError("--dropout applies to --model gated and pixelcnnpp only")
        if not 0 <= self.ema < 1:
            raise ValueError(f"--ema must be in [0, 1) (0: off), got {self.ema}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"--warmup-steps and --weight-decay must be >= 0, got {self.warmup_steps}, {self.weight_decay}")
        if self.schedule == "cosine" and self.lr_decay != 1.0:
            raise ValueError("--lr-decay applies to --schedule constant only")
        for name in ("subset", "test_subset", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.subset is not None and self.subset < self.batch_size:
            raise ValueError(f"--batch-size {self.batch_size} exceeds --subset {self.subset}: not one full batch to train on")
        for name in ("grid_samples", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        check_seed(self.seed, "--seed")
        if self.image_size is not None:
            self.image_size = tuple(int(s) for s in self.image_size)
        if self.background is not None:  # "white", or config.json's list: (R, G, B), as it is compared on a rerun
            self.background = ImageOptions(background=self.background).background
        if self.dataset_shape is not None:
            self.dataset_shape = tuple(int(s) for s in self.dataset_shape)
        if self.own_images:
            self.image_options()  # its own checks (sizes, channels, fraction)
        elif any(getattr(self, name) for name in ("test_dataset", "image_size", "channels", "image_column",
                                                  "label_column", "skip_bad_images", "background")):
            raise ValueError("--test-dataset, --image-size, --channels, --image-column, --label-column, "
                             "--skip-bad-images and --background apply to your own images, not to a torchvision "
                             "dataset")
        # The model's own checks (kernel size, depth, ...), named by their flags: the model config owns them.
        try:  # both models' flags, whichever model is trained
            for model in MODELS:
                self.model_config(shape=(1, 1, 1), classes=0, model=model)
        except ValueError as error:
            names = "|".join(f.name for f in fields(self))
            raise ValueError(re.sub(rf"\b({names})\b", lambda m: flag_name(m.group(1)), str(error))) from None

    @property
    def own_images(self) -> bool:
        return self.dataset not in DATASETS

    def image_options(self, *, test_fraction: float | None = None) -> ImageOptions:
        return ImageOptions(image_size=self.image_size, channels=self.channels, image_column=self.image_column,
                            label_column=self.label_column, skip_bad_images=self.skip_bad_images,
                            background=self.background,
                            test_fraction=self.test_fraction if test_fraction is None else test_fraction)

    def model_config(self, shape: tuple[int, int, int] | None = None, classes: int | None = None, model=None):
        """The model's config for this run's data: its (C, H, W) and classes, from the arguments, what the
        driver recorded, or torchvision's table (``model``: another model's, for checking its flags)."""
        if shape is None:
            shape = self.dataset_shape or DATASET_SHAPES[self.dataset][:3]
        if classes is None:
            classes = self.dataset_classes if self.own_images else DATASET_SHAPES[self.dataset][3]
        channels, height, width = shape
        common = dict(in_channels=channels, image_size=(height, width), num_classes=classes if self.conditional else 0)
        if (model or self.model) == "gated":
            return GatedPixelCNNConfig(**common, hidden=self.hidden, layers=self.layers, kernel_size=self.kernel_size,
                                       dropout=self.dropout)
        if (model or self.model) == "pixelcnnpp":
            return PixelCNNppConfig(**common, nr_filters=self.hidden, nr_resnet=self.nr_resnet,
                                    nr_logistic_mix=self.nr_logistic_mix, dropout=self.dropout)
        return PixelCNNConfig(**common, hidden=self.hidden, blocks=self.blocks, norm=self.norm)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def load_split(cfg: TrainConfig, train: bool, **kwargs) -> ImageData:
    """The training or test split of ``cfg``'s data, in memory (``kwargs``: e.g. a filesystem)."""
    if cfg.own_images and not train and cfg.test_dataset:
        return load_dataset(cfg.test_dataset, train=True, subset=cfg.test_subset, **kwargs,
                            **asdict(cfg.image_options(test_fraction=0)))
    if cfg.own_images:
        options = cfg.image_options(test_fraction=0 if cfg.test_dataset else None)
        return load_dataset(cfg.dataset, train=train, subset=cfg.subset if train else cfg.test_subset, **kwargs,
                            **asdict(options))
    return load_dataset(cfg.dataset, cfg.data_dir, train=train, subset=cfg.subset if train else cfg.test_subset,
                        download=cfg.download)


# --- the data, as batches ------------------------------------------------------------------------


class Batch(NamedTuple):
    levels: torch.Tensor  # uint8 [n, C, H, W]: this worker's share of the global batch
    labels: torch.Tensor  # int64 [n]
    total: int  # images in the global batch (every worker's shares together)


class InMemoryBatches:
    """Exact batches from data held in memory: a function of (seed, epoch, step) and the worker's rank.

    Epoch e is a permutation seeded by (seed, e), cut into global batches of ``batch_size``, the last one
    short (so each image is trained on once per epoch); worker r of w takes images ``r n // w`` to
    ``(r + 1) n // w`` of each global batch of n.
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int, rank: int, world_size: int, device):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        # Small datasets live on the device: no loader, no host->device copies in the loop.
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.steps_per_epoch = math.ceil(len(data) / batch_size)
        self.shape, self.num_classes = data.shape, data.num_classes

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(derive_seed(self.seed, 1, epoch)))
        order = order.to(self.images.device)
        for step in range(start, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            n = len(batch)
            share = batch[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]
            yield Batch(self.images[share], self.labels[share], n)


# --- the runtime ---------------------------------------------------------------------------------


class Runtime:
    """Single process, one device, data in memory, artefacts in a local run folder. Subclass for
    distribution (``jobs/train.py``)."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str, device: str | torch.device = "cpu", log=print):
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.log = log

    def load_data(self, cfg: TrainConfig):
        """(training batches, test data in memory)."""
        train_data, test_data = load_split(cfg, train=True), load_split(cfg, train=False)
        batches = InMemoryBatches(train_data, cfg.batch_size, cfg.seed, self.rank, self.world_size, self.device)
        batches.num_classes = max(train_data.num_classes, test_data.num_classes)  # own images: labels seen in either
        if cfg.conditional and batches.num_classes and cfg.own_images and not train_data.classes:  # a label column
            labels = torch.cat([train_data.labels, test_data.labels]).unique().tolist()
            batches.num_classes = class_count(labels, cfg.dataset)
        return batches, test_data

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def resume_state(self) -> dict | None:
        """The run folder's checkpoint, if any (a corrupt one is a ``CheckpointError``)."""
        path = os.path.join(self.run_dir, MODEL_FILE)
        return load_checkpoint(path) if os.path.exists(path) else None

    def publish(self, metrics: dict, checkpoint: dict | None, files: dict[str, bytes]) -> None:
        """Rank 0's report: ``files`` (metrics.jsonl, metrics.png, sample grids), then the model, each
        written whole; the model last, so a crash between them leaves files a resume rewrites."""
        if checkpoint is None:
            return
        for name, data in files.items():
            write_atomically(os.path.join(self.run_dir, name), data)
        save_checkpoint(os.path.join(self.run_dir, MODEL_FILE), checkpoint)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def report_files(history: list[dict], curve: list[dict]) -> dict[str, bytes]:
    """The run folder's record of a run, rewritten whole from the checkpoint's lists at each report (so a
    resumed run never lists a line twice): ``metrics.jsonl`` (one line per report), ``curve.jsonl`` (one
    line per point of the curve: every --log-every steps, each evaluation and each report) and
    ``metrics.png`` (the curve: train bits/dim, and test bits/dim where evaluated)."""
    return {"metrics.jsonl": jsonl(history), "curve.jsonl": jsonl(curve), "metrics.png": metrics_png(curve)}


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``warmup_steps``, capped at a quarter of the schedule's steps (``epochs`` x steps per epoch, which
    ``max_steps`` does not change: a run stopped early and resumed keeps its schedule). Runs at least
    four times as long as their warm-up keep it as asked."""
    return min(cfg.warmup_steps, cfg.epochs * steps_per_epoch // 4)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), a function of the step alone.

    Linear warm-up over ``warmup_steps()``, then "cosine": half a cosine from ``lr`` down to ~0 at the
    last step of ``epochs`` (``max_steps`` only stops early), or "constant": ``lr`` times
    ``lr_decay`` per finished epoch.
    """
    warm = warmup_steps(cfg, steps_per_epoch)
    warmup = min(1.0, (step + 1) / warm) if warm else 1.0
    if cfg.schedule == "constant":
        return cfg.lr * warmup * cfg.lr_decay ** (step // steps_per_epoch)
    horizon = cfg.epochs * steps_per_epoch - warm
    progress = min(1.0, max(0.0, (step - warm) / max(1, horizon)))
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
    batches, test_data = runtime.load_data(cfg)
    if cfg.conditional and not batches.num_classes:
        raise ValueError(f"--conditional needs labels, and {cfg.dataset} has none")
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model_class = MODELS[cfg.model]
    model = model_class(cfg.model_config(batches.shape, batches.num_classes)).to(device, getattr(torch, cfg.precision))
    # One parameter group, every tensor decayed alike (the masked-out kernel entries get no gradient,
    # so decay only shrinks values that are multiplied by zero anyway).
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history, curve = 0, [], []
    state = runtime.resume_state()
    if state is not None:
        training = state["training"]
        # With EMA the checkpoint's model_state is the average; the raw weights the optimizer steps
        # travel in training["raw_state"].
        model.load_state_dict(training.get("raw_state", state["model_state"]))
        optimizer.load_state_dict(training["optimizer"])
        for group in optimizer.param_groups:
            # The stored hyperparameters are the writing run's; this run's flags win (a changed
            # --weight-decay, say). lr is set every step.
            group.update(optimizer.defaults)
        step, history = state["step"], list(training["history"])
        curve = list(training.get("curve", history))  # a checkpoint from before the curve: its reports
        log(f"resuming from step {step} with {runtime.world_size} worker{'s' * (runtime.world_size > 1)}")
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
    dims = math.prod(test_data.shape)

    def point(window: list, evaluated: bool) -> dict:
        """A point of the curve: the window since the last one (train bits/dim, images/s) and, when
        ``evaluated``, the test figures. ``epoch`` counts whole epochs done, as the sample grids do."""
        line = {
            "step": step, "epoch": step // steps_per_epoch, "world_size": runtime.world_size,
            "lr": optimizer.param_groups[0]["lr"], **_reduce_window(window, runtime, dims),
        }
        if evaluated:
            test_bpd = evaluate_sharded(final_model, test_data, cfg.eval_batch_size, runtime, autocast)
            line["test_bits_per_dim"] = test_bpd
            line["test_bits_per_dim_raw"] = (
                evaluate_sharded(model, test_data, cfg.eval_batch_size, runtime, autocast) if ema else test_bpd)
        # Seconds in the training loop (steps, evaluations, reports), summed over the run's starts.
        line["elapsed_s"] = round(elapsed + time.perf_counter() - loop_started, 3)
        return line

    window: list[tuple[float, int, float]] = []  # (loss sum in nats, images, seconds) since the last point
    progress = Progress(total_steps, runtime.world_size, log)
    elapsed, loop_started = (curve[-1].get("elapsed_s", 0.0) if curve else 0.0), time.perf_counter()
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        for levels, batch_labels, total in batches.epoch(epoch, offset):
            if step >= epoch_end:
                break
            started = time.perf_counter()
            if cfg.dropout:
                # Masks from (seed, step, rank), not from whatever the global generator went through
                # before: a resumed run draws the same masks as one that never stopped.
                torch.manual_seed(derive_seed(cfg.seed, 2, step, runtime.rank))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, steps_per_epoch)
            count = len(levels)
            if not count:  # a share of no images (a short last batch): a zero-weighted step keeps DDP in step
                levels, batch_labels = torch.zeros_like(test_data.images[:1]).to(device), torch.zeros(1, dtype=torch.long, device=device)
            with autocast:
                nll, loss = share_loss(train_model, levels, batch_labels, total, runtime.world_size, weight=count > 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            if ema is not None:
                ema.update(model, step)
            window.append((float(nll.detach()), count, time.perf_counter() - started))
            at_epoch_end = step == epoch_end
            logged = step % cfg.log_every == 0 or at_epoch_end
            if logged:
                progress.line(step, epoch, steps_per_epoch, window, dims)
            reported = at_epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            evaluated = reported or (cfg.eval_every and step % cfg.eval_every == 0)
            if not (logged or evaluated):
                continue
            # Every rank reaches the same points (they depend on the step alone): the window's all-reduce
            # and the evaluation stay in step across workers.
            curve.append(point(window, evaluated))
            window = []
            if reported:
                # The report is the curve's point at this step: its train figure is the last window's.
                metrics = {**curve[-1], **({"done": True} if step == total_steps else {})}
                history.append(metrics)
                files, checkpoint = {}, None
                if runtime.rank == 0:
                    if at_epoch_end and cfg.grid_samples:
                        files[grid_name(step, steps_per_epoch)] = sample_grid_png(final_model, cfg.grid_samples, cfg.seed)
                    files.update(report_files(history, curve))
                    training = {"optimizer": optimizer.state_dict(), "history": history, "curve": curve,
                                "config": cfg.to_dict()}
                    if ema is not None:
                        training["raw_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                    checkpoint = checkpoint_dict(
                        final_model, step=step, epoch=step // steps_per_epoch, dataset=cfg.dataset, training=training,
                    )
                runtime.publish(metrics, checkpoint, files)
                log(progress.report(metrics), flush=True)
        if step < epoch_end:  # a stream that ran dry early (it cannot for data in memory)
            raise RuntimeError(f"the training data of epoch {epoch + 1} ended at step {step}, before {epoch_end}")
    return history[-1] if history else {"step": step, "done": True}


def grid_name(step: int, steps_per_epoch: int) -> str:
    """The sample grid's file: after each epoch ``samples_epoch_NNN.png``, NNN the whole epochs done (as
    metrics' ``epoch``); a run that stops mid-epoch (--max-steps) names its last grid by its step."""
    if step % steps_per_epoch:
        return f"samples_step_{step:06d}.png"
    return f"samples_epoch_{step // steps_per_epoch:03d}.png"


def share_loss(model, levels, labels, total: int, world_size: int, weight: float = 1.0):
    """(summed NLL in nats, the loss to step on) of one worker's share of a global batch of ``total`` images.

    DDP averages gradients over workers: weighting the share's summed NLL by workers / (total x dims) makes
    that average the gradient of the mean loss per dimension over the global batch, whatever the shares.
    """
    output = model_logits(model, levels, labels)
    nll = -distribution_of(model).log_prob(output.to(torch.promote_types(output.dtype, torch.float32)), levels.long()).sum()
    nll = nll * weight
    return nll, nll * (world_size / (total * math.prod(levels.shape[1:])))


class Progress:
    """What rank 0 prints: a progress line every ``--log-every`` steps and one line per report."""

    def __init__(self, total_steps: int, world_size: int, log):
        self.total_steps, self.world_size, self.log = total_steps, world_size, log

    def line(self, step: int, epoch: int, steps_per_epoch: int, recent: list, dims: int) -> None:
        loss = sum(w[0] for w in recent) / max(1, sum(w[1] for w in recent)) / dims / math.log(2)
        seconds = sum(w[2] for w in recent) / len(recent)
        eta = (self.total_steps - step) * seconds
        self.log(f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) epoch {epoch + 1} | loss "
                 f"{loss:.4f} bits/dim (this worker) | {sum(w[1] for w in recent) * self.world_size / max(1e-9, sum(w[2] for w in recent)):.1f} "
                 f"images/s | ETA {_duration(eta)}", flush=True)

    @staticmethod
    def report(metrics: dict) -> str:
        train = metrics.get("train_bits_per_dim")
        return (f"report at step {metrics['step']}: train {train:.4f}, test {metrics['test_bits_per_dim']:.4f} bits/dim"
                if train is not None else f"report at step {metrics['step']}: test {metrics['test_bits_per_dim']:.4f} bits/dim") + \
            (" (done)" if metrics.get("done") else "") + " " + json.dumps(metrics)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _reduce_window(window: list, runtime: Runtime, dims: int) -> dict:
    """Training loss (bits/dim) and throughput since the last report, summed over all workers."""
    totals = torch.tensor(
        [sum(w[0] for w in window), sum(w[1] for w in window), sum(w[2] for w in window)], dtype=torch.float64,
        device=runtime.device,
    )
    loss_sum, count, seconds = runtime.all_reduce_sum(totals).tolist()
    if not count:
        return {}
    return {
        "train_bits_per_dim": loss_sum / (count * dims) / math.log(2),
        # each worker's seconds overlap: images/s = images / (mean seconds per worker)
        "images_per_s": count / (seconds / runtime.world_size),
    }


@torch.no_grad()
def evaluate_sharded(model, data: ImageData, batch_size: int, runtime: Runtime, autocast=contextlib.nullcontext()) -> float:
    """Exact test bits/dim: every worker sums NLL over its share of the test set, then all-reduce."""
    was_training = model.training
    model.eval()
    indices = torch.arange(runtime.rank, len(data), runtime.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        levels = data.images[batch].to(runtime.device)
        with autocast:
            logits = model_logits(model, levels, data.labels[batch].to(runtime.device))
        total[0] += nll_per_image(logits, levels, distribution_of(model)).sum()
        total[1] += len(batch)
    model.train(was_training)
    nll, count = runtime.all_reduce_sum(total).tolist()
    return bits_per_dim(nll, int(count), math.prod(data.shape))


def sample_grid_png(model, count: int, seed: int) -> bytes:
    """A PNG grid of ``count`` samples (conditional models: classes in turn), 4x enlarged."""
    labels = torch.arange(count) % model.config.num_classes if model.config.num_classes else None
    return grid_png(sample(model, count, seed=seed, labels=labels, batch_size=count).images)
