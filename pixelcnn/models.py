"""PixelCNN (van den Oord et al. 2016, arXiv 1601.06759) and Gated PixelCNN (arXiv 1606.05328).

Contract shared by every model in this package (training, evaluation, sampling and the jobs rely on it):

    logits = model(x, labels=None)

* ``x``: float images ``[B, C, H, W]`` holding ``pixel / (levels - 1)`` (``pixel / 255`` for 8 bits);
* ``labels``: class ids ``[B]`` (long) for a conditional model (``num_classes > 0``), else ``None``;
* ``logits``: ``[B, levels, C, H, W]``, a ``levels``-way softmax per pixel and channel, the logits at
  (c, i, j) depending only on pixels before (i, j) in raster order and channels before c at (i, j).

No distributed or storage code lives here: parallelism and I/O are applied from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MaskedConv2d, causal_mask

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
        _check_common(self)
        if self.hidden < self.in_channels or self.blocks < 0:
            raise ValueError(f"need hidden >= in_channels and blocks >= 0, got {self.hidden}, {self.blocks}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


def _check_common(cfg) -> None:
    """Checks every model config shares (it normalises ``image_size`` to a tuple of ints)."""
    object.__setattr__(cfg, "image_size", tuple(int(s) for s in cfg.image_size))
    if cfg.in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {cfg.in_channels}")
    if len(cfg.image_size) != 2 or min(cfg.image_size) < 1:
        raise ValueError(f"image_size must be (height, width) >= 1, got {cfg.image_size}")
    if not 2 <= cfg.levels <= 256:
        raise ValueError(f"levels must be in 2..256, got {cfg.levels}")
    if cfg.num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {cfg.num_classes}")


def _config_from(model_class, config, overrides: dict):
    """A model's config: the one given, or its config class built from keyword overrides (not both)."""
    if config is not None and overrides:
        raise TypeError("pass either a config or keyword overrides, not both")
    return config if config is not None else model_class.config_class(**overrides)


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
        self.config = cfg = _config_from(type(self), config, overrides)
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


# --- Gated PixelCNN -------------------------------------------------------------------------------


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
        _check_common(self)
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
        self.config = cfg = _config_from(type(self), config, overrides)
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
        # An out-of-range label would be a device-side assert on a GPU. The check reads the labels back
        # (one sync, both ends at once); a compiled model skips it rather than break its graph there.
        if labels.numel() and not torch.compiler.is_compiling():
            low, high = torch.stack(labels.aminmax()).tolist()
            if low < 0 or high >= cfg.num_classes:
                raise ValueError(f"labels must lie in 0..{cfg.num_classes - 1}")
    elif labels is not None:
        raise ValueError("this model is unconditional (num_classes=0): pass labels=None")


MODEL_CLASSES: dict[str, type[nn.Module]] = {"PixelCNN": PixelCNN, "GatedPixelCNN": GatedPixelCNN}


def build_model(name: str, config: dict) -> nn.Module:
    """Instantiate a model class by name from a plain-dict config (as stored in checkpoints)."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[name]
    return cls(cls.config_class(**config))
