"""What a training run is: ``TrainConfig``, the recipe's flags (data, model, optimisation, reporting),
each declared once with its help and check; ``jobs/train.py`` turns it into its command line and a run
folder's ``config.json`` holds it. ``model_config`` picks the model family's own config from the one
registry in ``pixelcnn.models``."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from .data import DATASET_SHAPES, DATASETS, source_option
from .images import ImageOptions
from .models import MODELS, NORMS, GatedPixelCNNConfig, PixelCNNConfig, PixelCNNppConfig
from .options import flag_name, option
from .sampling.streams import check_seed

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


def duration(text: str) -> float:
    """``--max-time``: seconds, or a duration such as 90s, 30m, 1h, 2h30m."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d*)?)h)?\s*(?:(\d+(?:\.\d*)?)m)?\s*(?:(\d+(?:\.\d*)?)s?)?\s*", text.lower())
    if not text.strip() or match is None:
        raise ValueError(f"--max-time must be seconds or a duration such as 90s, 30m, 1h, 2h30m, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


@dataclass
class TrainConfig:
    # data
    dataset: str = option("mnist", "mnist, fashion_mnist, cifar10 (torchvision), synthetic (tiny, for tests), or "
                          "a folder, Parquet file/folder/glob of your own images, local or s3://", identity=True,
                          group="data")
    data_dir: str = source_option("data_dir", group="data")
    download: bool = source_option("download", group="data")
    subset: int | None = option(None, "train on the first N training images only", identity=True, group="data")
    test_subset: int | None = option(None, "evaluate on the first N test images only (default: all)", group="data")
    test_dataset: str | None = option(None, "your own images: a separate test set (default: a --test-fraction of "
                                      "--dataset)", identity=True, group="data")
    test_fraction: float = source_option("test_fraction", identity=True, group="data")
    image_size: tuple[int, int] | None = option(None, "your own images: resize (Lanczos) and centre-crop to H or "
                                                "HxW (default: they must share one size)", identity=True,
                                                parse=image_size, metavar="H[xW]", group="data")
    channels: int | None = option(None, "your own images: convert to 1 (L) or 3 (RGB) channels (default: they must "
                                  "share one mode, L or RGB)", identity=True, choices=(1, 3), group="data")
    image_column: str | None = source_option("image_column", identity=True, group="data")
    label_column: str | None = option(None, "Parquet: the integer label column (default: label, if there is one)",
                                      identity=True, group="data")
    skip_bad_images: bool = source_option("skip_bad_images", group="data")
    background: tuple[int, int, int] | None = source_option("background", identity=True, group="data")
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
    # A budget rather than a length: the steps it buys are measured once, before training, and recorded as
    # schedule_steps (config.json, checkpoints), so a resume or another worker count trains the same steps.
    max_time: float | None = option(None, "train for about this long (90s, 30m, 1h, 2h30m, or seconds): the steps "
                                    "it buys are measured on a worker before training and fixed in config.json; "
                                    "the schedule spans them (instead of --epochs)", identity=True, parse=duration,
                                    metavar="TIME", group="optimisation")
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
    # Set from --max-time before the first step (not a flag): the steps the run trains and its schedule spans.
    schedule_steps: int | None = None

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
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"--max-time must be > 0, got {self.max_time:g} s")
        for name in ("subset", "test_subset", "max_steps", "schedule_steps"):
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
