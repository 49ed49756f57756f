"""PixelCNN (van den Oord et al. 2016, arXiv 1601.06759): masked convolutions, residual blocks, a
256-way softmax per subpixel (the contract every model shares is in ``pixelcnn/models/__init__.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributions import Categorical
from ..layers import MaskedConv2d
from .common import check_common, check_input, config_from, scale_input

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
        check_common(self)
        if self.hidden < self.in_channels or self.blocks < 0:
            raise ValueError(f"need hidden >= in_channels and blocks >= 0, got {self.hidden}, {self.blocks}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

    def distribution(self) -> Categorical:
        """What the model's output parameterises: a ``levels``-way softmax per subpixel."""
        return Categorical(self.levels)


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
        self.config = cfg = config_from(type(self), config, overrides)
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
