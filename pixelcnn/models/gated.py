"""Gated PixelCNN without blind spot (van den Oord et al. 2016, arXiv 1606.05328): vertical and horizontal
stacks, tanh x sigmoid gates, a 256-way softmax per subpixel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributions import Categorical
from ..layers import MaskedConv2d, causal_mask
from .common import check_common, check_input, config_from, scale_input


@dataclass(frozen=True)
class GatedPixelCNNConfig:
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    hidden: int = 64  # channels of each stack
    layers: int = 12  # gated layers
    kernel_size: int = 5  # odd: vertical kernels are (k//2 + 1) x k, horizontal 1 x (k//2 + 1)
    levels: int = 256
    num_classes: int = 0  # > 0: class-conditional, a learned per-class bias in every gated layer
    dropout: float = 0.0  # on the gated horizontal features, training only
    # Dilation of gated layer l is dilations[l % len(dilations)] (e.g. (1, 2, 4)); None: all 1. Dilated
    # layers widen the receptive field at the same cost; undilated ones in the cycle fill its gaps.
    dilations: tuple[int, ...] | None = None

    def __post_init__(self):
        check_common(self)
        if self.hidden < self.in_channels or self.layers < 1:
            raise ValueError(f"need hidden >= in_channels and layers >= 1, got {self.hidden}, {self.layers}")
        # kernel 1 would give the horizontal stack no pixel to its left: every row a blind spot.
        if self.kernel_size < 3 or self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dilations is not None:
            object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
            if not self.dilations or min(self.dilations) < 1:
                raise ValueError(f"dilations must be None or a non-empty tuple of ints >= 1, got {self.dilations}")

    def dilation(self, layer: int) -> int:
        return self.dilations[layer % len(self.dilations)] if self.dilations else 1

    def distribution(self) -> Categorical:
        """What the model's output parameterises: a ``levels``-way softmax per subpixel."""
        return Categorical(self.levels)


class StackConv2d(nn.Conv2d):
    """A convolution padded on chosen sides only, with an optional fixed 0/1 mask on its kernel.

    ``pad`` is ``F.pad``'s (left, right, top, bottom): it decides which input window each output sees.
    A negative bottom pad crops the last row, which shifts the output down one row. As in
    ``MaskedConv2d`` the mask is applied on the fly, never written into ``weight``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, pad, dilation=1, mask=None):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.pad = tuple(pad)
        self.register_buffer("mask", mask, persistent=False)

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.pad), self.masked_weight(), self.bias, dilation=self.dilation)


def vertical_conv(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, *, shift: bool = False):
    """A (k//2 + 1) x k conv whose output at row i sees input rows i - d(k//2) .. i (``shift``: .. i - 1)."""
    reach = dilation * (kernel_size // 2)
    pad = (reach, reach, reach + 1, -1) if shift else (reach, reach, reach, 0)
    return StackConv2d(in_channels, out_channels, (kernel_size // 2 + 1, kernel_size), pad, dilation)


def horizontal_conv(mask_type: str, in_channels: int, out_channels: int, kernel_size: int, data_channels: int,
                    dilation: int = 1, *, halves: int = 1):
    """A 1 x (k//2 + 1) conv over columns j - d(k//2) .. j of row i, the centre tap channel-masked.

    The centre follows ``causal_mask``'s groups (feature k in group k % C). ``halves=2``: the output is
    two halves (the gate's tanh and sigmoid inputs) and feature k of each half is in group k % C,
    so tanh(a_k) * sigmoid(b_k) stays in group k % C whatever ``out_channels / 2`` is modulo C.
    """
    p = kernel_size // 2
    half = out_channels // halves
    mask = torch.ones(out_channels, in_channels, 1, p + 1)
    mask[:, :, 0, p] = causal_mask(mask_type, half, in_channels, 1, data_channels)[:, :, 0, 0].repeat(halves, 1)
    return StackConv2d(in_channels, out_channels, (1, p + 1), (dilation * p, 0, 0, 0), dilation, mask)


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation tanh(a) * sigmoid(b) of the two channel halves (a, b) of ``x``."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer (paper, Fig. 2): vertical and horizontal stacks, link, residual and skip.

    Both stacks' features at row i see only rows < i (vertical) or row i up to the current pixel
    (horizontal), so the vertical stack can feed the horizontal one at the same row through a 1x1
    ``link`` without a shift: the shift is made once, by the model's input layer.
    """

    def __init__(self, cfg: GatedPixelCNNConfig, dilation: int = 1, last: bool = False):
        super().__init__()
        h, c, k = cfg.hidden, cfg.in_channels, cfg.kernel_size
        self.v_conv = vertical_conv(h, 2 * h, k, dilation)
        self.h_conv = horizontal_conv("B", h, 2 * h, k, c, dilation, halves=2)
        # Vertical features come from earlier rows only, so every horizontal group may read all of them.
        self.link = nn.Conv2d(2 * h, 2 * h, 1)
        # The last layer's horizontal output feeds nothing (only its skip does): no residual conv there,
        # or its weights would never get a gradient and DDP (find_unused_parameters=False) would fail.
        self.residual = None if last else MaskedConv2d("B", h, h, 1, c)
        self.skip = MaskedConv2d("B", h, h, 1, c)
        self.dropout = nn.Dropout(cfg.dropout)
        # Class conditioning: one learned bias per class for both gate halves of both stacks
        # ([vertical 2h | horizontal 2h]); zero at init, as in ResidualBlock. The same at every pixel,
        # so it cannot break causality.
        self.label_bias = nn.Embedding(cfg.num_classes, 4 * h) if cfg.num_classes else None
        if self.label_bias is not None:
            nn.init.zeros_(self.label_bias.weight)

    def forward(self, v, h, labels=None):
        """(vertical, horizontal) features -> (vertical, horizontal, skip) features."""
        v_pre = self.v_conv(v)
        h_pre = self.h_conv(h) + self.link(v_pre)
        if self.label_bias is not None:
            v_bias, h_bias = self.label_bias(labels)[:, :, None, None].chunk(2, dim=1)
            v_pre, h_pre = v_pre + v_bias, h_pre + h_bias
        g = self.dropout(gate(h_pre))
        return gate(v_pre), h if self.residual is None else h + self.residual(g), self.skip(g)


class GatedPixelCNN(nn.Module):
    """Gated PixelCNN without blind spot (van den Oord et al. 2016, arXiv 1606.05328).

    Input layer: the vertical stack looks at the rows strictly above the pixel (every column its
    kernel spans, left *and* right), the horizontal stack at the pixels strictly left of it in its
    row (mask A at the centre for RGB). Each gated layer widens both; their union covers every
    earlier pixel, with no blind spot above-right as PixelCNN's 3x3 mask-B stacks have. Then the sum
    of the layers' skip outputs, ReLU, 1x1, ReLU, 1x1 to ``levels * C`` logits (mask B, groups).
    """

    config_class = GatedPixelCNNConfig

    def __init__(self, config: GatedPixelCNNConfig | None = None, **overrides):
        super().__init__()
        self.config = cfg = config_from(type(self), config, overrides)
        h, c, k = cfg.hidden, cfg.in_channels, cfg.kernel_size
        self.input_v = vertical_conv(c, h, k, shift=True)
        self.input_h = horizontal_conv("A", c, h, k, c)
        self.layers = nn.ModuleList(
            GatedLayer(cfg, cfg.dilation(n), last=n == cfg.layers - 1) for n in range(cfg.layers)
        )
        # 4h wide: the output layer maps it to 256 logits per channel, a 4x wider head than the stacks.
        self.head = MaskedConv2d("B", h, 4 * h, 1, c)
        self.output_conv = MaskedConv2d("B", 4 * h, cfg.levels * c, 1, c)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_input(self.config, x, labels)
        x = scale_input(x)
        v, h = self.input_v(x), self.input_h(x)
        skip = 0
        for layer in self.layers:
            v, h, s = layer(v, h, labels)
            skip = skip + s
        logits = self.output_conv(F.relu(self.head(F.relu(skip))))
        b, _, height, width = x.shape
        return logits.view(b, self.config.levels, self.config.in_channels, height, width)
