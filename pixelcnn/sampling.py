"""Autoregressive sampling: a naive oracle and a cached incremental sampler that draws the same images.

Random streams. Sample ``k`` of a call with ``seed`` uses its own uniforms ``u[k, p]`` (p = the raster
index of pixel-channel (i, j, c), pixel-major), a counter-based hash of (seed, k, p). Each value is
drawn by inverse CDF: the smallest level whose cumulative probability exceeds ``u``. So sample ``k``
depends only on (model, seed, k, temperature), never on batch size or batch order. The samplers sum in
different orders, so they part where a draw lands within rounding of a CDF boundary: never seen in
float64 (the tests draw identical images), rarely in float32, in most bfloat16 images. (Batch sizes can
change the order of a library's sums too: in float32 logits move by ~1e-6, not seen to flip a draw.)

Naive (``method="naive"``): one full forward pass per pixel and channel, H*W*C passes per batch. It is
the reference every faster sampler is tested against.

Cached (``method="cached"``, the default): every layer of PixelCNN reads, at (i, j), only raster
positions <= (i, j) of the layer below (the 7x7 mask-A and 3x3 mask-B kernels reach three and one
rows up, never down or right in the same row). A value computed at (i, j) therefore never changes
once pixel (i, j) is drawn, so each step computes every layer at the new position only and caches
the result. Per masked conv with kernel k it caches the conv's *input* for the last k//2 + 1 rows
(full width, zero-padded): that is all the rows the kernel can reach. The part of the conv that reads
the rows above is computed for a whole row when it starts (one large matrix product per layer); each
pixel step adds only the current row's taps (one small one). Memory is O(layers x batch x channels x
2 rows x width) instead of a full image per layer, and compute per pixel is one column of the network
instead of all of it.
GatedPixelCNN's vertical stack sees only rows above, so it is computed a whole row at a time when the
row starts; its horizontal stack a pixel at a time, as above (``_GatedStepper``).

CUDA graphs. On a GPU the cached step is over a hundred tiny kernels per pixel (reference model), so its speed
is set by launch overhead, not arithmetic. The whole loop over an image has fixed shapes and fixed
indices, so ``sample`` captures it once as one CUDA graph and replays it per batch (``_GraphedRun``):
one launch per batch instead of ~10^5. The graph runs exactly the kernels of the eager loop on the same
inputs, so it draws the same images (a test on a GPU checks this).

Fused (``method="fused"``, PixelCNN on CUDA): the cached loop and caches, with each pixel step one
Triton kernel instead of over a hundred library ops (``fused.py``); graphed the same way.
"""

from __future__ import annotations

import os
import weakref
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import levels_to_input
from .layers import MaskedConv2d
from .models import GatedPixelCNN, PixelCNN, StackConv2d, gate, scale_input

METHODS = ("cached", "naive", "fused")


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
    cdf = torch.softmax(logits if temperature == 1 else logits / temperature, dim=-1).cumsum(-1)
    # levels whose cumulative probability is <= u come before it (so u = 0 skips a probability-0 level)
    level = (cdf <= u[:, None]).sum(-1).clamp_(max=logits.shape[-1] - 1)
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
    labels: int | Sequence[int] | torch.Tensor | None = None,
    cuda_graph: bool = True,
) -> Samples:
    """Draw images from ``model``: ``Samples(images uint8 [N, C, H, W], log_prob float64 [N])``.

    Samples are numbered ``0..num_samples-1`` (or by ``ids``); sample k depends only on (seed, k).
    ``labels`` (conditional models): one class for all samples, or one per sample.
    Sampling runs where the model is, in its dtype (``model.to("cuda")`` first to sample on a GPU).
    ``method="fused"``: the cached sampler with each pixel step one Triton kernel (``fused.py``),
    for PixelCNN on CUDA devices.
    ``cuda_graph`` (cached and fused methods on CUDA): replay the sampling loop as one CUDA graph once a batch
    shape repeats (see the module docstring); the images are the same either way. A model's graphs
    have fixed input and output buffers: do not sample one model from several threads at once.
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
    if not -2**63 <= seed < 2**63:
        raise ValueError(f"seed must be a 64-bit integer (-2**63 to 2**63 - 1), got {seed}")
    cfg = model.config
    labels = _sample_labels(cfg, labels, len(ids))
    param = next(model.parameters())
    device = param.device
    was_training = model.training
    if method == "fused":
        _check_fused(model, device)
    model.eval()  # sampling uses running statistics, never batch statistics
    if method == "naive":
        run = _sample_naive
    elif cuda_graph and device.type == "cuda":
        run = partial(_sample_cached_graphed, method=method)
    else:
        run = partial(_sample_cached, method=method)
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


def _check_fused(model, device: torch.device) -> None:
    """One clear error where ``method="fused"`` cannot run."""
    if type(model) is not PixelCNN:
        raise ValueError(f"method='fused' samples PixelCNN only, not {type(model).__name__}; use method='cached'")
    if not model.blocks:
        raise ValueError("method='fused' needs a PixelCNN with at least one residual block; use method='cached'")
    # Triton compiles for GPUs; its interpreter runs the same kernel on the CPU, slowly (for tests).
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"method='fused' runs on a CUDA device, not {device.type}; use method='cached'")
    # 3.6 is the oldest Triton the kernel is tested with (the one beside PyTorch 2.11 on our H100 machine).
    try:
        import triton  # PyTorch's CUDA builds install it
    except ImportError:
        raise ValueError("method='fused' needs Triton >= 3.6: pip install triton") from None
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ValueError(f"method='fused' needs Triton >= 3.6, this is {triton.__version__}; use method='cached'")


@torch.no_grad()
def _stepper(model, batch: int, dtype, device, method: str = "cached") -> "_Stepper":
    if method == "fused":
        from .fused import FusedPixelCNNStepper as stepper
    else:
        stepper = CACHED_STEPPERS.get(type(model))
    if stepper is None:
        raise ValueError(f"no cached sampler for {type(model).__name__}; use method='naive'")
    return stepper(model, batch, dtype, device)


def _sample_cached(model, u, labels, temperature, dtype, method="cached"):
    return _stepper(model, u.shape[0], dtype, u.device, method).run(u, labels, temperature)


class _GraphedRun:
    """The cached sampling loop for one batch shape, captured as one CUDA graph.

    Static inputs ``u`` and ``labels`` are copied in before each replay; the stepper's caches are
    zeroed inside the graph (``_Stepper.run`` starts with ``reset``), so every replay starts clean.
    The graph reads the model's weights as they were at capture: some as copies (the masked conv
    weights rearranged per tap, the summed skip biases), some in place (biases, norms, label
    embeddings), hence ``_GraphCache``.
    """

    def __init__(self, model, u, labels, temperature, dtype, method):
        self.stepper = _stepper(model, u.shape[0], dtype, u.device, method)
        self.u = u.clone()
        self.labels = None if labels is None else labels.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.stepper.run(self.u, self.labels, temperature)

    def __call__(self, u, labels):
        self.u.copy_(u)
        if labels is not None:
            self.labels.copy_(labels)
        self.graph.replay()
        return self.out[0].clone(), self.out[1].clone()


class _GraphCache:
    """One model's captured graphs, valid while its weights are the ones they were captured with.

    ``runs`` maps (shape, temperature, dtype, device, unconditional, method, precision settings) to a
    ``_GraphedRun``, to None (seen once: a shape is captured the second time it is seen, so a one-off
    batch never pays for a capture) or to "eager" (its capture failed). Valid means every parameter and buffer has the same storage
    and the same values as at capture: values are compared, not version counters, because some
    in-place writes (``.data``, fused optimizers) leave the counter alone. ``held`` keeps the
    captured storages alive, so a new tensor can never reuse an address the graphs read.
    """

    MAX_SHAPES = 4

    def __init__(self, weights: list):
        self.held = weights
        self.values = [t.clone() for t in weights]
        self.runs: dict = {}

    def valid_for(self, weights: list) -> bool:
        return len(weights) == len(self.held) and all(
            h.device == t.device and h.dtype == t.dtype and h.shape == t.shape and h.data_ptr() == t.data_ptr()
            and torch.equal(v, t)
            for h, v, t in zip(self.held, self.values, weights)
        )


_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, _GraphCache]" = weakref.WeakKeyDictionary()


def _precision_settings() -> tuple:
    """torch's float32 precision (TF32) and autocast settings, as far as this torch can read them. A graph
    replays the kernels chosen when it was captured, so one captured under other settings is not reused."""
    readings = [torch.is_autocast_enabled()]
    for read in (lambda: torch.backends.cuda.matmul.fp32_precision, lambda: torch.backends.cuda.matmul.allow_tf32,
                 lambda: torch.backends.cudnn.conv.fp32_precision, lambda: torch.backends.cudnn.allow_tf32):
        try:
            readings.append(read())
        except (AttributeError, RuntimeError):  # not in this torch; or a legacy flag after the new setting
            readings.append(None)
    return tuple(readings)


def _sample_cached_graphed(model, u, labels, temperature, dtype, method):
    weights = [t.detach() for t in (*model.parameters(), *model.buffers())]
    cache = _GRAPHS.get(model)
    if cache is None or not cache.valid_for(weights):
        cache = _GRAPHS[model] = _GraphCache(weights)
    key = (u.shape, temperature, dtype, u.device, labels is None, method, _precision_settings())
    if key not in cache.runs:  # first sight: run eagerly, capture next time
        if len(cache.runs) >= cache.MAX_SHAPES:
            cache.runs.pop(next(iter(cache.runs)))  # the oldest shape, and its graph's memory
        cache.runs[key] = None
        return _sample_cached(model, u, labels, temperature, dtype, method)
    run = cache.runs[key]
    if isinstance(run, _GraphedRun):
        with torch.cuda.device(u.device):
            return run(u, labels)
    if run == "eager":
        return _sample_cached(model, u, labels, temperature, dtype, method)
    with torch.cuda.device(u.device):  # second sight: capture
        # Warm up on a side stream first (PyTorch's recipe for capture): cuBLAS handles and
        # workspaces are made outside the graph. This run's result is the current batch's.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = _sample_cached(model, u, labels, temperature, dtype, method)
        torch.cuda.current_stream().wait_stream(side)
        try:
            cache.runs[key] = _GraphedRun(model, u, labels, temperature, dtype, method)
        except RuntimeError:  # e.g. no memory left for the graph's pool: stay eager for this shape
            cache.runs[key] = "eager"
    return result


# --- cached samplers: shared pieces, and PixelCNN's ----------------------------------------------


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
    """A causal conv evaluated one output position at a time over a rolling buffer of its input rows.

    ``weight [Cout, Cin, rows, kw]`` (masked) holds the kernel rows that reach the rows above and the
    current one (the last): PixelCNN's k x k masked convs (rows k//2 + 1), or Gated PixelCNN's 1 x kw
    horizontal convs (one row, dilation ``d`` along it). The buffer holds the conv's input for those
    rows (last slot: the current row), zero-padded left and right like the full conv, so the window of
    output column j starts at padded column j. A dilated conv reads every d-th column, so each row is
    stored split by column mod d: ``buffer [B, rows, d, ceil(cols / d), Cin]``, padded column c at
    ``[c % d, c // d]``; then the taps of any column are adjacent in memory.

    The output is computed in two parts. The rows above are final once a row starts, so ``start_row``
    computes their part for every column of the row in one matrix product, bias included
    (``row_term [B, W, Cout]``; an owner may add its own per-row terms). Each step then needs only the
    current row's taps at columns <= j: one small matmul that reads them in place (a view of the
    buffer). A step's input is written straight into its buffer slot (``slots[j]``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, batch: int, width: int, dtype, device, *,
                 pad_left: int, dilation: int = 1):
        cout, cin, rows, kw = weight.shape
        d = dilation
        assert rows == 1 or d == 1, "only one-row (horizontal) convs are dilated in these models"
        weight = weight.to(dtype)
        cols = width + (kw - 1) * d  # pad_left + width + pad_right, the kernel spanning (kw - 1) d + 1 columns
        self.buffer = torch.zeros(batch, rows, d, -(-cols // d), cin, dtype=dtype, device=device)
        self.bias = bias.to(dtype)
        self.row_term = torch.zeros(batch, width, cout, dtype=dtype, device=device)
        self.weight_now, self.weight_above = self.tap_weights(weight, pad_left, d)
        taps = pad_left // d + 1
        self.kw = kw
        # Per column, fixed views into the buffer and row_term (shared storage, updated in place).
        current = self.buffer[:, -1]
        self.slots = [current[:, (j + pad_left) % d, (j + pad_left) // d] for j in range(width)]
        self.taps = [current[:, j % d, j // d:j // d + taps].view(batch, -1) for j in range(width)]  # never copies
        self.row_terms = [self.row_term[:, j] for j in range(width)]

    @staticmethod
    def tap_weights(weight: torch.Tensor, pad_left: int, dilation: int = 1):
        """``weight [Cout, Cin, rows, kw]`` as the matrices a step and a row start multiply by:
        (current row ``[taps Cin, Cout]``, rows above ``[(rows - 1) kw Cin, Cout]`` or None)."""
        cout, cin, rows, _ = weight.shape
        # Current row: kernel columns x = 0 .. pad_left / d read padded columns j + x d (x d <= pad_left:
        # the input at or left of j). As a matrix [taps * Cin, Cout], matching the taps [B, taps, Cin] flattened.
        taps = pad_left // dilation + 1
        now = weight[:, :, -1, :taps].permute(2, 1, 0).reshape(taps * cin, cout).contiguous()
        # Rows above (undilated): kernel row y reads buffer row y, columns j + x, every x:
        # [(rows - 1) kw Cin, Cout], matching the windows [y, x, Cin] that ``start_row`` unfolds.
        above = weight[:, :, :-1].permute(2, 3, 1, 0).reshape(-1, cout).contiguous() if rows > 1 else None
        return now, above

    @classmethod
    def masked(cls, conv: MaskedConv2d, batch: int, width: int, dtype, device) -> "_CachedConv":
        """A same-padded k x k masked conv: its kernel rows 0 .. k//2 reach the rows it may read."""
        pad = conv.kernel_size[0] // 2
        return cls(conv.masked_weight()[:, :, :pad + 1], conv.bias, batch, width, dtype, device, pad_left=pad)

    def reset(self) -> None:
        self.buffer.zero_()

    def start_row(self, i: int, extra: torch.Tensor | None = None) -> None:
        """Start row ``i`` (rows < i of the input written): roll the buffer, compute ``row_term``
        (bias + the rows above's part, + ``extra``, broadcast to ``[B, W, Cout]``)."""
        b, width, cout = self.row_term.shape
        if i:  # roll: the current row becomes the last row above; the new current row starts empty
            if self.buffer.shape[1] > 1:
                self.buffer[:, :-1] = self.buffer[:, 1:].clone()
            self.buffer[:, -1].zero_()
        if self.weight_above is None:
            self.row_term.copy_(self.bias.expand_as(self.row_term))
        else:
            # [B, rows - 1, cols, Cin] -> windows [B, rows - 1, W, Cin, kw] -> [B W, (rows - 1) kw Cin]
            windows = self.buffer[:, :-1, 0].unfold(2, self.kw, 1)
            windows = windows.permute(0, 2, 1, 4, 3).reshape(b * width, -1)
            torch.addmm(self.bias, windows, self.weight_above, out=self.row_term.view(b * width, cout))
        if extra is not None:
            self.row_term += extra

    def write(self, j: int, x: torch.Tensor) -> torch.Tensor:
        return self.slots[j].copy_(x)

    def __call__(self, j: int) -> torch.Tensor:
        return torch.addmm(self.row_terms[j], self.taps[j], self.weight_now)


class _Stepper:
    """The raster loop every cached sampler shares: pixel by pixel, channel by channel.

    A subclass sets ``input_cache`` (the cached conv that reads the image in the current row),
    ``reset(labels)`` (zero every cache, compute the label terms), ``start_row(i, levels)`` (called
    once rows < i are drawn) and ``logits_at(j)`` (logits ``[B, levels, C]`` at (current row, j),
    filling every layer's cache at j), or instead of ``logits_at`` a whole ``step``. A stepper can run
    any number of batches of its size.
    """

    cfg = None
    dtype = None
    input_cache: _CachedConv

    def reset(self, labels: torch.Tensor | None) -> None:
        raise NotImplementedError

    def start_row(self, i: int, levels: torch.Tensor) -> None:
        raise NotImplementedError

    def logits_at(self, j: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def run(self, u: torch.Tensor, labels: torch.Tensor | None, temperature: float):
        self.reset(labels)
        b, height, width, channels = u.shape
        levels = torch.zeros(b, channels, height, width, dtype=torch.long, device=u.device)
        log_prob = torch.zeros(b, dtype=torch.float64, device=u.device)
        # The model's input value of each level, computed as the model computes it (so bit-identical).
        input_values = scale_input(levels_to_input(torch.arange(self.cfg.levels, device=u.device),
                                                   self.cfg.levels, self.dtype))
        for i in range(height):
            self.start_row(i, levels)
            for j in range(width):
                for c in range(channels):
                    self.step(i, j, c, u, levels, log_prob, input_values, temperature)
        return levels, log_prob

    def step(self, i, j, c, u, levels, log_prob, input_values, temperature) -> None:
        """Draw channel c of pixel (i, j) into ``levels``, add its log-prob, write it into the input buffer."""
        # Channels < c of this pixel are in the input buffer; the rest are still zero, and masked out
        # of every logit we read (features at (i, j) never see the last channel).
        level, lp = draw(self.logits_at(j)[:, :, c], u[:, i, j, c], temperature)
        levels[:, c, i, j] = level
        log_prob += lp
        self.input_cache.slots[j][:, c] = input_values.index_select(0, level)


class _PixelCNNStepper(_Stepper):
    def __init__(self, model: PixelCNN, batch: int, dtype, device):
        cfg = model.config
        width = cfg.image_size[1]
        self.cfg = cfg
        self.input_conv = self.input_cache = _CachedConv.masked(model.input_conv, batch, width, dtype, device)
        self.input_norm = model.input_norm
        self.blocks = [
            (_Pointwise(block.reduce, dtype), block.norm1, _CachedConv.masked(block.conv, batch, width, dtype, device),
             block.norm2, _Pointwise(block.expand, dtype), block.norm3)
            for block in model.blocks
        ]
        self.label_embeddings = [block.label_bias for block in model.blocks]
        self.label_biases = []
        self.head = [_Pointwise(conv, dtype) for conv in model.head]
        self.output = _Pointwise(model.output_conv, dtype)
        self.caches = [self.input_conv] + [b[2] for b in self.blocks]
        self.dtype = dtype

    def reset(self, labels: torch.Tensor | None) -> None:
        for cache in self.caches:
            cache.reset()
        # A block's class bias is added right after its 3x3 conv: fold it into that conv's row term.
        self.label_biases = [None if e is None else e(labels).to(self.dtype)[:, None] for e in self.label_embeddings]

    def start_row(self, i: int, levels: torch.Tensor) -> None:
        self.input_conv.start_row(i)
        for (_, _, conv, *_), bias in zip(self.blocks, self.label_biases):
            conv.start_row(i, bias)

    def logits_at(self, j: int) -> torch.Tensor:
        h = _pointwise_norm(self.input_norm, self.input_conv(j))
        for reduce, norm1, conv, norm2, expand, norm3 in self.blocks:
            # ReLU, written straight into the 3x3 conv's input buffer at (current row, j).
            torch.clamp_min(_pointwise_norm(norm1, reduce(F.relu(h))), 0, out=conv.slots[j])
            t = _pointwise_norm(norm2, conv(j))
            h = h + _pointwise_norm(norm3, expand(F.relu(t)))
        for conv in self.head:
            h = conv(F.relu(h))
        return self.output(F.relu(h)).view(h.shape[0], self.cfg.levels, self.cfg.in_channels)


# --- cached sampler for GatedPixelCNN -----------------------------------------------------------


class _RowConv:
    """A vertical-stack conv computed for a whole row at once, over a rolling buffer of its input rows.

    ``buffer [B, Cin, d (kh - 1) + 1, W + 2 reach]``: the last rows of the conv's input, zero-padded
    like the full conv (rows above the image start as zeros). ``push`` appends the newest row; the
    conv over the buffer is then exactly one output row, as a batched ``conv2d`` (a row at a time
    costs W times fewer calls than a pixel at a time).
    """

    def __init__(self, conv: StackConv2d, batch: int, width: int, dtype, device):
        left, right, _, _ = conv.pad
        rows = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        self.weight = conv.masked_weight().to(dtype)
        self.bias = conv.bias.to(dtype)
        self.dilation = conv.dilation
        self.left = left
        self.buffer = torch.zeros(batch, conv.in_channels, rows, left + width + right, dtype=dtype, device=device)

    def reset(self) -> None:
        self.buffer.zero_()

    def push(self, row: torch.Tensor) -> None:
        """Append input row ``[B, Cin, W]`` (the oldest row drops out)."""
        if self.buffer.shape[2] > 1:
            self.buffer[:, :, :-1] = self.buffer[:, :, 1:].clone()
        self.buffer[:, :, -1, self.left:self.left + row.shape[-1]] = row

    def __call__(self) -> torch.Tensor:
        return F.conv2d(self.buffer, self.weight, self.bias, dilation=self.dilation)[:, :, 0]  # [B, Cout, W]


class _GatedStepper(_Stepper):
    """Cached sampling for GatedPixelCNN: a row of the vertical stack at a time, a pixel of the
    horizontal stack at a time.

    What is cached, and why that is exact:

    * Vertical stack. Its features at row i depend only on rows < i (the input layer looks strictly
      above; each later vertical conv reads rows <= i of features that see only rows < i). So they are
      final once row i starts: ``start_row`` computes every layer's vertical features for the whole
      row i in one batched conv each (``_RowConv``: the last d (k//2) + 1 rows of that layer's input),
      and adds the row's link term ``link(v_pre) [B, W, 2h]`` (and the class bias) to the horizontal
      conv's row term, so the horizontal stack reads it for free.
    * Horizontal stack. Its features at (i, j) read row i of the layer below at columns <= j only, so
      a value at (i, j) never changes once written. Per pixel, one column of every layer is computed
      from a one-row buffer of that layer's input (``_CachedConv``, only the taps left of and at j).

    Memory: per layer the buffers hold d (k//2) + 1 rows (vertical) and one row (horizontal) of
    ``hidden`` channels, plus one row of 2 ``hidden`` link terms: O(layers x batch x channels x a few
    rows x width), never a whole image per layer.
    """

    def __init__(self, model: GatedPixelCNN, batch: int, dtype, device):
        cfg = self.cfg = model.config
        self.dtype = dtype
        width = cfg.image_size[1]
        self.input_v = _RowConv(model.input_v, batch, width, dtype, device)
        self.input_cache = self._cached(model.input_h, batch, width, dtype, device)
        self.layers = []
        for layer in model.layers:
            self.layers.append(SimpleNamespace(
                v_conv=_RowConv(layer.v_conv, batch, width, dtype, device),
                h_conv=self._cached(layer.h_conv, batch, width, dtype, device),
                link=layer.link, label_embedding=layer.label_bias, v_bias=None, h_bias=None,
                residual=None if layer.residual is None else _Pointwise(layer.residual, dtype),
                skip=_Pointwise(layer.skip, dtype),
            ))
        # The skip sum starts from all the skip convs' biases at once; each layer then adds g @ W.
        self.skip_bias = sum(layer.skip.bias for layer in self.layers)
        self.head = _Pointwise(model.head, dtype)
        self.output = _Pointwise(model.output_conv, dtype)

    @staticmethod
    def _cached(conv: StackConv2d, batch: int, width: int, dtype, device) -> _CachedConv:
        return _CachedConv(conv.masked_weight(), conv.bias, batch, width, dtype, device,
                           pad_left=conv.pad[0], dilation=conv.dilation[1])

    def reset(self, labels: torch.Tensor | None) -> None:
        self.input_v.reset()
        self.input_cache.reset()
        for layer in self.layers:
            layer.v_conv.reset()
            layer.h_conv.reset()
            if layer.label_embedding is not None:
                v_bias, h_bias = layer.label_embedding(labels).to(self.dtype).chunk(2, dim=1)
                layer.v_bias, layer.h_bias = v_bias[:, :, None, None], h_bias[:, None]

    def start_row(self, i: int, levels: torch.Tensor) -> None:
        if i:
            self.input_v.push(scale_input(levels_to_input(levels[:, :, i - 1], self.cfg.levels, self.dtype)))
        v = self.input_v()
        for layer in self.layers:
            layer.v_conv.push(v)
            v_pre = layer.v_conv()[:, :, None]  # [B, 2h, 1, W]
            link = layer.link(v_pre)[:, :, 0].transpose(1, 2)  # [B, W, 2h]
            layer.h_conv.start_row(i, link if layer.h_bias is None else link + layer.h_bias)
            if layer.v_bias is not None:
                v_pre = v_pre + layer.v_bias
            v = gate(v_pre)[:, :, 0]
        self.input_cache.start_row(i)

    def logits_at(self, j: int) -> torch.Tensor:
        h = self.layers[0].h_conv.write(j, self.input_cache(j))
        skip = None
        for layer, next_layer in zip(self.layers, self.layers[1:] + [None]):
            g = gate(layer.h_conv(j))
            if layer.residual is not None:  # h + residual(g), written straight into the next layer's buffer
                h = torch.add(h, layer.residual(g), out=next_layer.h_conv.slots[j])
            skip = torch.addmm(self.skip_bias, g, layer.skip.weight) if skip is None else skip.addmm_(g, layer.skip.weight)
        logits = self.output(F.relu(self.head(F.relu(skip))))
        return logits.view(logits.shape[0], self.cfg.levels, self.cfg.in_channels)


CACHED_STEPPERS: dict[type, type] = {PixelCNN: _PixelCNNStepper, GatedPixelCNN: _GatedStepper}
