"""PixelCNN (van den Oord et al. 2016, arXiv 1601.06759).

Contract shared by every model in this package (training, evaluation, sampling and the jobs rely on it):

    logits = model(x, labels=None)

* ``x``: float images ``[B, C, H, W]`` holding ``pixel / (levels - 1)`` (``pixel / 255`` for 8 bits);
* ``labels``: class ids ``[B]`` (long) for a conditional model (``num_classes > 0``), else ``None``;
* ``logits``: ``[B, levels, C, H, W]``, a ``levels``-way softmax per pixel and channel, the logits at
  (c, i, j) depending only on pixels before (i, j) in raster order and channels before c at (i, j).

No distributed or storage code lives here: parallelism and I/O are applied from outside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MaskedConv2d

NORMS = ("none", "batch")


@dataclass(frozen=True)
class PixelCNNConfig:
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    hidden: int = 128
    blocks: int = 15
    levels: int = 256
    # Default "none": BatchNorm in train mode normalises with statistics pooled over the batch and
    # all pixels, so each logit depends on *later* pixels through the mean and variance; the training
    # loss then sees the future and is no longer a valid likelihood (tests/test_causality.py shows
    # the leak). "batch" is kept for comparison with the reference network; it is causal in eval mode.
    norm: str = "none"
    num_classes: int = 0  # > 0: class-conditional, a learned per-class bias in every block

    def __post_init__(self):
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (height, width) >= 1, got {self.image_size}")
        if self.hidden < self.in_channels or self.blocks < 0:
            raise ValueError(f"need hidden >= in_channels and blocks >= 0, got {self.hidden}, {self.blocks}")
        if not 2 <= self.levels <= 256:
            raise ValueError(f"levels must be in 2..256, got {self.levels}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


class ResidualBlock(nn.Module):
    """ReLU, 1x1 2h->h, ReLU, 3x3 mask-B h->h, ReLU, 1x1 h->2h, plus the input (paper, Fig. 5).

    The 1x1 convolutions are mask-B too: with one data channel that changes nothing, with RGB it
    keeps G and B features from leaking into R within the same pixel.
    """

    def __init__(self, cfg: PixelCNNConfig):
        super().__init__()
        h, c = cfg.hidden, cfg.in_channels
        self.reduce = MaskedConv2d("B", 2 * h, h, 1, c)
        self.norm1 = _norm(cfg.norm, h)
        self.conv = MaskedConv2d("B", h, h, 3, c)
        self.norm2 = _norm(cfg.norm, h)
        self.expand = MaskedConv2d("B", h, 2 * h, 1, c)
        self.norm3 = _norm(cfg.norm, 2 * h)
        # Class conditioning: a learned bias per class, added after the 3x3 conv. A bias is the same
        # at every pixel, so it cannot break causality.
        self.label_bias = nn.Embedding(cfg.num_classes, h) if cfg.num_classes else None
        if self.label_bias is not None:
            nn.init.zeros_(self.label_bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(self.reduce(F.relu(x)))
        h = self.conv(F.relu(h))
        if self.label_bias is not None:
            h = h + self.label_bias(labels)[:, :, None, None]
        h = self.norm2(h)
        h = self.norm3(self.expand(F.relu(h)))
        return x + h


class PixelCNN(nn.Module):
    """The reference PixelCNN: 7x7 mask A, ``blocks`` residual blocks, two 1x1 mask-B convs, logits."""

    config_class = PixelCNNConfig

    def __init__(self, config: PixelCNNConfig | None = None, **overrides):
        super().__init__()
        cfg = config if config is not None else PixelCNNConfig(**overrides)
        if config is not None and overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = cfg
        h, c = cfg.hidden, cfg.in_channels
        self.input_conv = MaskedConv2d("A", c, 2 * h, 7, c)
        self.input_norm = _norm(cfg.norm, 2 * h)
        self.blocks = nn.ModuleList(ResidualBlock(cfg) for _ in range(cfg.blocks))
        self.head = nn.ModuleList([MaskedConv2d("B", 2 * h, 2 * h, 1, c), MaskedConv2d("B", 2 * h, 2 * h, 1, c)])
        self.output_conv = MaskedConv2d("B", 2 * h, cfg.levels * c, 1, c)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self.config, x, labels)
        h = self.input_norm(self.input_conv(scale_input(x)))
        for block in self.blocks:
            h = block(h, labels)
        for conv in self.head:
            h = conv(F.relu(h))
        logits = self.output_conv(F.relu(h))
        b, _, height, width = x.shape
        return logits.view(b, self.config.levels, self.config.in_channels, height, width)


def scale_input(x: torch.Tensor) -> torch.Tensor:
    """Map ``[0, 1]`` inputs to ``[-1, 1]``: zero-centred inputs train faster."""
    return x * 2 - 1


def check_input(cfg, x: torch.Tensor, labels: torch.Tensor | None) -> None:
    """One clear error for images or labels this model cannot take."""
    expected = (cfg.in_channels, *cfg.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{type(cfg).__name__.removesuffix('Config')} expects images [B, {expected[0]}, {expected[1]}, "
            f"{expected[2]}] (channels, height, width); got {list(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"model input must be float pixel/{cfg.levels - 1}, got dtype {x.dtype}")
    if cfg.num_classes:
        if labels is None:
            raise ValueError(f"this model is class-conditional ({cfg.num_classes} classes): labels are required")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape [{x.shape[0]}], got {list(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes):
            raise ValueError(f"labels must lie in 0..{cfg.num_classes - 1}")
    elif labels is not None:
        raise ValueError("this model is unconditional (num_classes=0): pass labels=None")


MODEL_CLASSES: dict[str, type[nn.Module]] = {"PixelCNN": PixelCNN}


def build_model(name: str, config: dict) -> nn.Module:
    """Instantiate a model class by name from a plain-dict config (as stored in checkpoints)."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[name]
    return cls(cls.config_class(**config))


def model_config_dict(model: nn.Module) -> dict:
    return asdict(model.config)
