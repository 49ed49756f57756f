"""Autoregressive sampling: a naive oracle and a cached incremental sampler that draws the same images.

Random streams. Sample ``k`` of a call with ``seed`` uses its own uniforms ``u[k, p]`` (p = the raster
index of pixel-channel (i, j, c), pixel-major), a counter-based hash of (seed, k, p). Each value is
drawn by inverse CDF: the smallest level whose cumulative probability exceeds ``u``. So sample ``k``
depends only on (model, seed, k, temperature), never on batch size, batch order or sampler.

Naive (``method="naive"``): one full forward pass per pixel and channel, H*W*C passes per batch. It is
the reference every faster sampler is tested against.

Cached (``method="cached"``, the default): every layer of PixelCNN reads, at (i, j), only raster
positions <= (i, j) of the layer below (the 7x7 mask-A and 3x3 mask-B kernels reach one and three
rows up, never down or right in the same row). A value computed at (i, j) therefore never changes
once pixel (i, j) is drawn, so each step computes every layer at the new position only, as a
matrix product over the gathered causal neighbourhood, and caches the result. Per masked conv with
kernel k it caches the conv's *input* for the last k//2 + 1 rows (full width, zero-padded): that is
all the rows the kernel can reach. Memory is O(layers x batch x channels x 2 rows x width) instead
of a full image per layer, and compute per pixel is one column of the network instead of all of it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import levels_to_input
from .layers import MaskedConv2d
from .models import PixelCNN, scale_input

METHODS = ("cached", "naive")


class Samples(NamedTuple):
    images: torch.Tensor  # uint8 [N, C, H, W]
    log_prob: torch.Tensor  # float64 [N], log p(image) under the model (temperature 1), nats


# --- random streams ---------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, ids: Sequence[int] | np.ndarray, count: int, *, stream: int = 0) -> torch.Tensor:
    """Uniforms in [0, 1), float64 ``[len(ids), count]``; row k depends only on (seed, stream, ids[k]).

    ``stream`` separates independent uses of one seed (0: pixels, 1: labels drawn per sample).
    """
    with np.errstate(over="ignore"):
        ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
        key = _mix64(np.asarray([seed], dtype=np.int64).astype(np.uint64) * _GOLDEN + np.uint64(1))
        key = _mix64(key + np.uint64(stream) * _GOLDEN)
        stream = _mix64(key ^ _mix64(ids + _GOLDEN))  # one independent stream per sample id
        counters = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(stream[:, None] + counters[None, :])
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def labels_for_ids(seed: int, ids: Sequence[int] | np.ndarray, probs: Sequence[float]) -> torch.Tensor:
    """One class per sample id drawn from ``probs``; label k depends only on (seed, ids[k])."""
    cdf = torch.tensor(np.cumsum(probs) / np.sum(probs), dtype=torch.float64)
    u = sample_uniforms(seed, ids, 1, stream=1)[:, 0]
    return (cdf[None, :] <= u[:, None]).sum(1).clamp_(max=len(probs) - 1)


def draw(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw of one level per row of ``logits [B, L]``; returns (levels, log p at T=1)."""
    logits = logits.double()
    cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
    level = (cdf < u[:, None]).sum(-1).clamp_(max=logits.shape[-1] - 1)
    log_prob = torch.log_softmax(logits, dim=-1).gather(1, level[:, None])[:, 0]
    return level, log_prob


# --- public API -------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    model: nn.Module,
    num_samples: int | None = None,
    *,
    ids: Sequence[int] | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    method: str = "cached",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    labels: int | Sequence[int] | torch.Tensor | None = None,
) -> Samples:
    """Draw images from ``model``: ``Samples(images uint8 [N, C, H, W], log_prob float64 [N])``.

    Samples are numbered ``0..num_samples-1`` (or by ``ids``); sample k depends only on (seed, k).
    ``labels`` (conditional models): one class for all samples, or one per sample.
    ``device`` defaults to the model's; computation runs in the model's dtype.
    """
    if (num_samples is None) == (ids is None):
        raise ValueError("pass exactly one of num_samples and ids")
    ids = np.arange(num_samples, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) < 1:
        raise ValueError(f"need at least one sample, got {len(ids) if ids.ndim == 1 else ids.shape}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.config
    labels = _sample_labels(cfg, labels, len(ids))
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    was_training = model.training
    model.eval()  # sampling uses running statistics, never batch statistics
    run = _sample_naive if method == "naive" else _sample_cached
    images, log_probs = [], []
    try:
        for start in range(0, len(ids), batch_size):
            batch_ids = ids[start:start + batch_size]
            u = sample_uniforms(seed, batch_ids, cfg.in_channels * cfg.image_size[0] * cfg.image_size[1])
            u = u.view(len(batch_ids), *cfg.image_size, cfg.in_channels).to(device)
            batch_labels = None if labels is None else labels[start:start + batch_size].to(device)
            levels, log_prob = run(model, u, batch_labels, temperature, param.dtype)
            images.append(levels.to("cpu", torch.uint8))
            log_probs.append(log_prob.cpu())
    finally:
        model.train(was_training)
    return Samples(torch.cat(images), torch.cat(log_probs))


def _sample_labels(cfg, labels, count: int) -> torch.Tensor | None:
    if not cfg.num_classes:
        if labels is not None:
            raise ValueError("this model is unconditional: pass labels=None")
        return None
    if labels is None:
        raise ValueError(f"this model is class-conditional ({cfg.num_classes} classes): pass labels")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    labels = labels.expand(count) if labels.dim() == 0 else labels
    if labels.shape != (count,):
        raise ValueError(f"need one label or {count} labels, got shape {list(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes:
        raise ValueError(f"labels must lie in 0..{cfg.num_classes - 1}, got {sorted(set(labels.tolist()))[:5]}")
    return labels.contiguous()


def _sample_naive(model, u, labels, temperature, dtype):
    """One full forward pass per pixel and channel: H*W*C passes."""
    b, height, width, channels = u.shape
    cfg = model.config
    levels = torch.zeros(b, channels, height, width, dtype=torch.long, device=u.device)
    log_prob = torch.zeros(b, dtype=torch.float64, device=u.device)
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                logits = model(levels_to_input(levels, cfg.levels, dtype), labels)
                level, lp = draw(logits[:, :, c, i, j], u[:, i, j, c], temperature)
                levels[:, c, i, j] = level
                log_prob += lp
    return levels, log_prob


def _sample_cached(model, u, labels, temperature, dtype):
    stepper = CACHED_STEPPERS.get(type(model))
    if stepper is None:
        raise ValueError(f"no cached sampler for {type(model).__name__}; use method='naive'")
    return stepper(model, u.shape[0], labels, dtype, u.device).run(u, temperature)


# --- cached sampler for PixelCNN ----------------------------------------------------------------


def _pointwise_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode BatchNorm2d (or Identity) applied to features ``[B, C]`` of one position."""
    if isinstance(norm, nn.BatchNorm2d):
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    return x


class _Pointwise:
    """A 1x1 masked conv at one position: ``x [B, Cin] -> [B, Cout]``."""

    def __init__(self, conv: MaskedConv2d, dtype):
        self.weight = conv.masked_weight()[:, :, 0, 0].t().to(dtype).contiguous()
        self.bias = conv.bias.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class _CachedConv:
    """A k x k masked conv evaluated one position at a time over a rolling buffer of its input.

    ``buffer [B, k//2 + 1, W + 2 (k//2), Cin]``: the conv's input for rows i - k//2 .. i (last slot is
    the current row), zero-padded left and right like the full conv. Only the kernel taps the mask
    keeps (rows above, left of centre, centre) are gathered, so each step is one small matmul.
    """

    def __init__(self, conv: MaskedConv2d, batch: int, width: int, dtype, device):
        k = conv.kernel_size[0]
        self.pad = pad = k // 2
        self.cols = cols = width + 2 * pad
        weight = conv.masked_weight().to(dtype)  # [Cout, Cin, k, k]
        taps = [(dy, dx) for dy in range(pad + 1) for dx in range(k) if dy < pad or dx <= pad]
        dy = torch.tensor([t[0] for t in taps])
        dx = torch.tensor([t[1] for t in taps])
        # [Cout, Cin, P] -> [P * Cin, Cout], matching the gathered [B, P, Cin] flattened.
        self.weight = weight[:, :, dy, dx].permute(2, 1, 0).reshape(len(taps) * conv.in_channels, -1).contiguous()
        self.bias = conv.bias.to(dtype)
        # Flat buffer index of each tap for output column j: row slot dy, column j + dx.
        self.index = [(dy * cols + dx + j).to(device) for j in range(width)]
        self.buffer = torch.zeros(batch, pad + 1, cols, conv.in_channels, dtype=dtype, device=device)

    def next_row(self) -> None:
        if self.pad:
            self.buffer[:, :-1] = self.buffer[:, 1:].clone()
            self.buffer[:, -1].zero_()

    def write(self, j: int, x: torch.Tensor) -> None:
        self.buffer[:, -1, j + self.pad] = x

    def __call__(self, j: int) -> torch.Tensor:
        flat = self.buffer.view(self.buffer.shape[0], -1, self.buffer.shape[-1])
        taps = flat.index_select(1, self.index[j]).flatten(1)
        return torch.addmm(self.bias, taps, self.weight)


class _PixelCNNStepper:
    def __init__(self, model: PixelCNN, batch: int, labels, dtype, device):
        cfg = model.config
        width = cfg.image_size[1]
        self.cfg = cfg
        self.input_conv = _CachedConv(model.input_conv, batch, width, dtype, device)
        self.input_norm = model.input_norm
        self.blocks = []
        for block in model.blocks:
            bias = None if block.label_bias is None else block.label_bias(labels).to(dtype)
            self.blocks.append((
                _Pointwise(block.reduce, dtype), block.norm1,
                _CachedConv(block.conv, batch, width, dtype, device), bias, block.norm2,
                _Pointwise(block.expand, dtype), block.norm3,
            ))
        self.head = [_Pointwise(conv, dtype) for conv in model.head]
        self.output = _Pointwise(model.output_conv, dtype)
        self.caches = [self.input_conv] + [b[2] for b in self.blocks]
        self.dtype = dtype

    def logits_at(self, j: int) -> torch.Tensor:
        """Logits ``[B, levels, C]`` at (current row, j), filling every layer's cache at j."""
        h = _pointwise_norm(self.input_norm, self.input_conv(j))
        for reduce, norm1, conv, bias, norm2, expand, norm3 in self.blocks:
            conv.write(j, F.relu(_pointwise_norm(norm1, reduce(F.relu(h)))))
            t = conv(j)
            if bias is not None:
                t = t + bias
            t = _pointwise_norm(norm2, t)
            h = h + _pointwise_norm(norm3, expand(F.relu(t)))
        for conv in self.head:
            h = conv(F.relu(h))
        return self.output(F.relu(h)).view(h.shape[0], self.cfg.levels, self.cfg.in_channels)

    def run(self, u: torch.Tensor, temperature: float):
        b, height, width, channels = u.shape
        levels = torch.zeros(b, channels, height, width, dtype=torch.long, device=u.device)
        log_prob = torch.zeros(b, dtype=torch.float64, device=u.device)
        for i in range(height):
            if i:
                for cache in self.caches:
                    cache.next_row()
            for j in range(width):
                for c in range(channels):
                    # Channels < c of this pixel are drawn; later ones are masked out of every logit
                    # we read, and features at (i, j) never depend on the last channel.
                    self.input_conv.write(j, self._scaled(levels[:, :, i, j]))
                    level, lp = draw(self.logits_at(j)[:, :, c], u[:, i, j, c], temperature)
                    levels[:, c, i, j] = level
                    log_prob += lp
                self.input_conv.write(j, self._scaled(levels[:, :, i, j]))  # the finished pixel
        return levels, log_prob

    def _scaled(self, pixel_levels: torch.Tensor) -> torch.Tensor:
        return scale_input(levels_to_input(pixel_levels, self.cfg.levels, self.dtype))


CACHED_STEPPERS: dict[type, type] = {PixelCNN: _PixelCNNStepper}
