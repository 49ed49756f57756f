"""PixelCNN++ (Salimans et al. 2017, arXiv 1701.05517), after openai/pixel-cnn's pixel_cnn_pp/model.py.

Two streams replace masked convolutions, with no blind spot:

* ``u`` (down-shifted): its features at row i see only rows < i, every column its kernels reach;
* ``ul`` (down-right-shifted): its features at (i, j) see only pixels strictly before (i, j) in raster
  order; each of its blocks also reads ``u`` at the same position (a 1x1 "aux" input).

The network is a U-net over three resolutions (full, 1/2 and 1/4, stride-2 convs down and stride-2
transposed convs up, with skip connections from the up pass to the down pass), built from gated ResNet
blocks with concat_elu and dropout. Each down-pass block of ``ul`` reads ``u`` and the skip of its
up-pass twin. A stride-2 conv at low-resolution (i, j) reads full-resolution rows 2i - 1, 2i (and
columns up to 2j, or 2j + 1 in ``u``), and a transposed conv at (o_r, o_c) reads low-resolution
(o_r // 2, ...): both keep the streams' causality, which tests/test_pixelcnnpp.py proves by gradients.

The network sees only previous pixels: its output at (i, j) does not depend on pixel (i, j) at all. For
RGB the order R -> G -> B within a pixel comes from the output distribution, a mixture of discretized
logistics whose G means move linearly with R and whose B means with R and G (``distributions.py``).

    params = model(x, labels=None)   # [B, nr_logistic_mix * (1 + 2C + C(C-1)/2), H, W]

Any image size works: odd sizes are downsampled to ceil(size / 2) and the upsampled features cropped
at the bottom and right, which keeps causality. Not taken from the paper's code: its weight
normalisation and data-dependent initialisation (plain convs here, the second conv of each block
initialised 10x smaller so that blocks start near the identity, as its init_scale=0.1 intends).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributions import DiscretizedLogisticMixture
from .common import check_common, check_input, config_from, scale_input

LEVELS = 3  # resolutions: full, 1/2, 1/4


@dataclass(frozen=True)
class PixelCNNppConfig:
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    nr_filters: int = 160  # channels of both streams ("hidden")
    nr_resnet: int = 5  # gated ResNet blocks per resolution in the up pass (nr_resnet + 1 down, but at 1/4)
    nr_logistic_mix: int = 10  # logistics in each pixel's mixture
    levels: int = 256
    num_classes: int = 0  # > 0: class-conditional, a learned per-class bias in every gated block
    dropout: float = 0.5  # on each block's hidden features, training only (the paper's CIFAR-10 value)

    def __post_init__(self):
        check_common(self)
        if self.nr_filters < 1 or self.nr_resnet < 0 or self.nr_logistic_mix < 1:
            raise ValueError(f"need nr_filters >= 1, nr_resnet >= 0 and nr_logistic_mix >= 1, got {self.nr_filters}, "
                             f"{self.nr_resnet}, {self.nr_logistic_mix}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def distribution(self) -> DiscretizedLogisticMixture:
        """What the model's output parameterises: a discretized logistic mixture per pixel."""
        return DiscretizedLogisticMixture(self.nr_logistic_mix, self.in_channels, self.levels)

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) at each resolution: full, then ceil of half twice."""
        sizes = [self.image_size]
        for _ in range(LEVELS - 1):
            sizes.append(tuple(-(-s // 2) for s in sizes[-1]))
        return sizes


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of [x, -x] (channels doubled): like a concatenated ReLU, keeping both signs' information."""
    return F.elu(torch.cat([x, -x], 1))


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (zeros at the top): row i then holds what row i - 1 saw."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every column one right (zeros at the left)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class ShiftedConv2d(nn.Conv2d):
    """A conv padded on chosen sides only. Down-shifted (``right=True``): output (i, j) reads input rows
    i - kh + 1 .. i, columns j - kw // 2 .. j + kw // 2. Down-right-shifted: columns j - kw + 1 .. j.
    With stride s, output (i, j) reads the same window around input (s i, s j)."""

    def __init__(self, in_channels, out_channels, kernel_size, *, right: bool, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        kh, kw = kernel_size
        self.right = right
        self.pad = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0) if right else (kw - 1, 0, kh - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


def down_shifted(in_channels, out_channels, kernel_size=(2, 3), stride=1) -> ShiftedConv2d:
    return ShiftedConv2d(in_channels, out_channels, kernel_size, right=True, stride=stride)


def down_right_shifted(in_channels, out_channels, kernel_size=(2, 2), stride=1) -> ShiftedConv2d:
    return ShiftedConv2d(in_channels, out_channels, kernel_size, right=False, stride=stride)


class ShiftedDeconv2d(nn.ConvTranspose2d):
    """Stride-2 transposed conv back to a size, cropped so that output (o_r, o_c) reads only input row
    o_r // 2: down-shifted (2 x 3 kernel) columns (o_c + 1) // 2 and (o_c - 1) // 2, down-right-shifted
    (2 x 2 kernel) column o_c // 2. The crop drops the last rows and columns (and the down-shifted one's
    first column), which shifts nothing: causality holds."""

    def __init__(self, channels: int, *, right: bool):
        super().__init__(channels, channels, (2, 3) if right else (2, 2), stride=2)
        self.right = right

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        left = 1 if self.right else 0
        return super().forward(x)[:, :, :h, left:left + w]


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), where (a, b) = conv(dropout(concat_elu(conv(concat_elu(x)) + nin(concat_elu(aux)))))."""

    def __init__(self, cfg: PixelCNNppConfig, *, right: bool, aux_channels: int = 0):
        super().__init__()
        f = cfg.nr_filters
        conv = down_shifted if right else down_right_shifted
        self.conv1 = conv(2 * f, f)
        self.aux = nn.Conv2d(2 * aux_channels, f, 1) if aux_channels else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = conv(2 * f, 2 * f)
        with torch.no_grad():  # blocks start near the identity (the paper's code: init_scale=0.1)
            self.conv2.weight.mul_(0.1)
        # Class conditioning: one learned bias per class on the gate's inputs, zero at init as in the other
        # models. The same at every pixel, so it cannot break causality.
        self.label_bias = nn.Embedding(cfg.num_classes, 2 * f) if cfg.num_classes else None
        if self.label_bias is not None:
            nn.init.zeros_(self.label_bias.weight)

    def forward(self, x, aux=None, labels=None):
        c1 = self.conv1(concat_elu(x))
        if self.aux is not None:
            c1 = c1 + self.aux(concat_elu(aux))
        c2 = self.conv2(self.dropout(concat_elu(c1)))
        if self.label_bias is not None:
            c2 = c2 + self.label_bias(labels)[:, :, None, None]
        a, b = c2.chunk(2, 1)
        return x + a * torch.sigmoid(b)


class PixelCNNpp(nn.Module):
    """PixelCNN++: down-shifted (``u``) and down-right-shifted (``ul``) streams over three resolutions;
    the output parameterises ``config.distribution()``, a discretized logistic mixture per pixel."""

    config_class = PixelCNNppConfig

    def __init__(self, config: PixelCNNppConfig | None = None, **overrides):
        super().__init__()
        self.config = cfg = config_from(type(self), config, overrides)
        f, n = cfg.nr_filters, cfg.nr_resnet
        c = cfg.in_channels + 1  # + a channel of ones: tells the image from the zero padding
        self.u_input = down_shifted(c, f, (2, 3))  # then shifted down: rows i - 2, i - 1
        self.ul_input_up = down_shifted(c, f, (1, 3))  # then shifted down: row i - 1, columns j - 1 .. j + 1
        self.ul_input_left = down_right_shifted(c, f, (2, 1))  # then shifted right: rows i - 1, i, column j - 1

        def blocks(count, right, aux):
            return nn.ModuleList(GatedResnet(cfg, right=right, aux_channels=aux) for _ in range(count))

        # Index = resolution (0 full, 1 half, 2 quarter). The down pass runs 2 -> 0 and has one more block
        # per resolution but the lowest: it consumes the up pass's skips, one per up block plus each
        # resolution's first features (the input layer's or the stride-2 conv's).
        self.up_u = nn.ModuleList(blocks(n, True, 0) for _ in range(LEVELS))
        self.up_ul = nn.ModuleList(blocks(n, False, f) for _ in range(LEVELS))
        self.downsize_u = nn.ModuleList(down_shifted(f, f, (2, 3), stride=2) for _ in range(LEVELS - 1))
        self.downsize_ul = nn.ModuleList(down_right_shifted(f, f, (2, 2), stride=2) for _ in range(LEVELS - 1))
        down_counts = [n + 1] * (LEVELS - 1) + [n]
        self.down_u = nn.ModuleList(blocks(down_counts[level], True, f) for level in range(LEVELS))
        self.down_ul = nn.ModuleList(blocks(down_counts[level], False, 2 * f) for level in range(LEVELS))
        self.upsize_u = nn.ModuleList(ShiftedDeconv2d(f, right=True) for _ in range(LEVELS - 1))
        self.upsize_ul = nn.ModuleList(ShiftedDeconv2d(f, right=False) for _ in range(LEVELS - 1))
        self.output = nn.Conv2d(f, cfg.distribution().num_params(), 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self.config, x, labels)
        x = scale_input(x)
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        u = down_shift(self.u_input(x))
        ul = down_shift(self.ul_input_up(x)) + right_shift(self.ul_input_left(x))
        us, uls = [u], [ul]  # the up pass's features, consumed in reverse by the down pass
        for level in range(LEVELS):
            if level:
                u, ul = self.downsize_u[level - 1](u), self.downsize_ul[level - 1](ul)
                us.append(u)
                uls.append(ul)
            for u_block, ul_block in zip(self.up_u[level], self.up_ul[level]):
                u = u_block(u, labels=labels)
                ul = ul_block(ul, u, labels)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        sizes = self.config.sizes()
        for level in reversed(range(LEVELS)):
            if level < LEVELS - 1:
                u, ul = self.upsize_u[level](u, sizes[level]), self.upsize_ul[level](ul, sizes[level])
            for u_block, ul_block in zip(self.down_u[level], self.down_ul[level]):
                u = u_block(u, us.pop(), labels)
                ul = ul_block(ul, torch.cat([u, uls.pop()], 1), labels)
        return self.output(F.elu(ul))
