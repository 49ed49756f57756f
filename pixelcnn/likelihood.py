"""Negative log-likelihood and bits per dimension.

Training minimises the mean cross-entropy per dimension (nats); evaluation reports the exact test-set
figure: the sum of per-pixel NLL over every image and channel, divided by (dims x ln 2). Sums are
accumulated in float64 over every batch (no dropped last batch), so the figure does not depend on
the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import ImageData, levels_to_input


def config_of(model):
    """The config of a model, or of the one a DDP wrapper holds."""
    return model.config if hasattr(model, "config") else model.module.config


def model_logits(model, levels: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, L, C, H, W]`` for integer images; labels are passed only to conditional models."""
    cfg = config_of(model)
    x = levels_to_input(levels, cfg.levels, next(model.parameters()).dtype)
    return model(x, labels if cfg.num_classes else None)


def nll_per_image(logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Sum over pixels and channels of ``-log p(x)``, in nats, one value per image (float64)."""
    nll = F.cross_entropy(logits.double(), levels.long(), reduction="none")
    return nll.flatten(1).sum(1)


def loss_per_dim(logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Training loss: mean cross-entropy per dimension, in nats."""
    return F.cross_entropy(logits.float(), levels.long())


def bits_per_dim(total_nll_nats: float, num_images: int, dims_per_image: int) -> float:
    return total_nll_nats / (num_images * dims_per_image * math.log(2))


@torch.no_grad()
def evaluate(model, data: ImageData, *, batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
    """Exact NLL of ``data`` under ``model``: ``{'bits_per_dim', 'nll_nats_per_image', 'images'}``.

    ``data`` holds the model's levels: uint8 pixels for 256 levels, ``data.quantize``'s output for fewer."""
    levels = config_of(model).levels
    top = int(data.images.max()) if len(data) else 0
    if top >= levels:
        raise ValueError(f"the data holds level {top}, but the model has {levels} levels: "
                         f"quantize it first (pixelcnn.data.quantize(images, {levels}))")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(data), batch_size):
            levels = data.images[start:start + batch_size].to(device)
            labels = data.labels[start:start + batch_size].to(device)
            total += float(nll_per_image(model_logits(model, levels, labels), levels).sum())
    finally:
        model.train(was_training)
    dims = math.prod(data.shape)
    return {
        "bits_per_dim": bits_per_dim(total, len(data), dims),
        "nll_nats_per_image": total / len(data),
        "images": len(data),
    }
