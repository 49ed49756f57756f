"""Autoregressive sampling: ``sample(model, n, seed=..., sampler=...)``.

Sample k depends only on (model, seed, k, temperature): its random stream is a hash of (seed, k)
(``streams.py``). Three samplers draw the same images, up to float rounding at CDF boundaries:

* ``"naive"`` (``naive.py``): one full forward pass per pixel and channel; the oracle.
* ``"cached"`` (the default; ``steppers.py`` over ``cache.py``, PixelCNN++: ``pixelcnnpp.py``): each step
  computes every layer at the new position only, from caches of the last rows each conv can reach.
* ``"fused"`` (``fused.py``, PixelCNN on CUDA): the cached loop with each pixel step one Triton kernel.

On CUDA the cached and fused loops are replayed from CUDA graphs (``graphs.py``). docs/sampling.md
explains each and how it is proven equal to the naive sampler.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from ..distributions import draw
from ..models import GatedPixelCNN, PixelCNN, PixelCNNpp
from .graphs import run_graphed
from .naive import sample_naive
from .pixelcnnpp import PixelCNNppStepper
from .steppers import GatedStepper, PixelCNNStepper, Stepper
from .streams import check_seed, labels_for_ids, sample_uniforms

SAMPLERS = ("cached", "naive", "fused")

__all__ = ["SAMPLERS", "Samples", "draw", "labels_for_ids", "make_stepper", "sample", "sample_uniforms"]


class Samples(NamedTuple):
    images: torch.Tensor  # uint8 [N, C, H, W]
    log_prob: torch.Tensor  # float64 [N], log p(image) under the model (temperature 1), nats


@torch.no_grad()
def sample(
    model: nn.Module,
    num_samples: int | None = None,
    *,
    ids: Sequence[int] | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    sampler: str = "cached",
    batch_size: int = 64,
    labels: int | Sequence[int] | torch.Tensor | None = None,
    cuda_graph: bool = True,
) -> Samples:
    """Draw images from ``model``: ``Samples(images uint8 [N, C, H, W], log_prob float64 [N])``.

    Samples are numbered ``0..num_samples-1`` (or by ``ids``); sample k depends only on (seed, k).
    ``labels`` (conditional models): one class for all samples, or one per sample.
    Sampling runs where the model is, in its dtype (``model.to("cuda")`` first to sample on a GPU).
    ``sampler``: "cached", "naive" or "fused" (PixelCNN on CUDA devices, one Triton kernel per pixel step).
    ``temperature`` sharpens each subpixel's exact conditional p to p^(1/T), for every model family
    (softmax logits / T; PixelCNN++'s mixture alike, through its exact probabilities of the 256 levels).
    ``cuda_graph`` (cached and fused samplers on CUDA): replay the sampling loop as one CUDA graph once a
    batch shape repeats; the images are the same either way. A model's graphs have fixed input and output
    buffers: do not sample one model from several threads at once.
    """
    if (num_samples is None) == (ids is None):
        raise ValueError("pass exactly one of num_samples and ids")
    ids = np.arange(num_samples, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) < 1:
        raise ValueError(f"need at least one sample, got {len(ids) if ids.ndim == 1 else ids.shape}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_seed(seed)
    cfg = model.config
    labels = _check_labels(cfg, labels, len(ids))
    param = next(model.parameters())
    device = param.device
    if sampler == "fused":
        check_fused(model, device)
    was_training = model.training
    model.eval()  # sampling uses running statistics, never batch statistics
    images, log_probs = [], []
    try:
        for start in range(0, len(ids), batch_size):
            batch_ids = ids[start:start + batch_size]
            u = sample_uniforms(seed, batch_ids, cfg.in_channels * cfg.image_size[0] * cfg.image_size[1])
            u = u.view(len(batch_ids), *cfg.image_size, cfg.in_channels).to(device)
            batch_labels = None if labels is None else labels[start:start + batch_size].to(device)
            if sampler == "naive":
                levels, log_prob = sample_naive(model, u, batch_labels, temperature)
            else:
                def new_stepper(batch=len(batch_ids)):
                    return make_stepper(model, batch, param.dtype, device, sampler)

                if cuda_graph and device.type == "cuda":
                    levels, log_prob = run_graphed(model, u, batch_labels, temperature, sampler, new_stepper)
                else:
                    levels, log_prob = new_stepper().run(u, batch_labels, temperature)
            images.append(levels.to("cpu", torch.uint8))
            log_probs.append(log_prob.cpu())
    finally:
        model.train(was_training)
    return Samples(torch.cat(images), torch.cat(log_probs))


# Each family's cached stepper (naive sampling needs none: it runs the model itself).
CACHED_STEPPERS: dict[type, type] = {PixelCNN: PixelCNNStepper, GatedPixelCNN: GatedStepper, PixelCNNpp: PixelCNNppStepper}


@torch.no_grad()
def make_stepper(model: nn.Module, batch: int, dtype, device, sampler: str = "cached") -> Stepper:
    """The stepper that runs ``sampler``'s loop for ``model``, for batches of ``batch`` images."""
    if sampler == "fused":
        from .fused import FusedPixelCNNStepper  # Triton is imported only when the fused sampler is asked for

        return FusedPixelCNNStepper(model, batch, dtype, device)
    stepper = CACHED_STEPPERS.get(type(model))
    if stepper is None:
        raise ValueError(f"no cached sampler for {type(model).__name__}; use sampler='naive'")
    return stepper(model, batch, dtype, device)


def check_fused(model: nn.Module, device: torch.device) -> None:
    """One clear error where ``sampler="fused"`` cannot run."""
    if type(model) is not PixelCNN:
        raise ValueError(f"sampler='fused' samples PixelCNN only, not {type(model).__name__}; use sampler='cached'")
    if not model.blocks:
        raise ValueError("sampler='fused' needs a PixelCNN with at least one residual block; use sampler='cached'")
    # Triton compiles for GPUs; its interpreter runs the same kernel on the CPU, slowly (for tests).
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"sampler='fused' runs on a CUDA device, not {device.type}; use sampler='cached'")
    # 3.6 is the oldest Triton the kernel is tested with (the one beside PyTorch 2.11 on our H100 machine).
    try:
        import triton  # PyTorch's CUDA builds install it
    except ImportError:
        raise ValueError("sampler='fused' needs Triton >= 3.6: pip install triton") from None
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ValueError(f"sampler='fused' needs Triton >= 3.6, this is {triton.__version__}; use sampler='cached'")


def _check_labels(cfg, labels, count: int) -> torch.Tensor | None:
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
