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


@torch.no_grad()
def score(model, levels: torch.Tensor, labels: torch.Tensor | None = None, *, label_probs=None,
          per_pixel: bool = False) -> dict:
    """Exact log-likelihood of each image (teacher-forced: one forward pass), in nats, float64.

    Returns ``{"log_prob": [B]}``, plus for a conditional model given no ``labels`` the log-likelihood
    marginalised over classes, log sum_c p(c) p(x | c) with ``label_probs`` p(c) (uniform by default), and
    ``"likely_class"``, the class of the largest p(c) p(x | c); with ``per_pixel``, ``"nll_map"``: the NLL of
    each pixel in bits per dimension, averaged over its channels, ``[B, H, W]``.
    """
    cfg = config_of(model)
    if not cfg.num_classes or labels is not None:
        logits = model_logits(model, levels, labels)
        nll = F.cross_entropy(logits.double(), levels.long(), reduction="none")  # [B, C, H, W]
        out = {"log_prob": -nll.flatten(1).sum(1)}
    else:
        prior = torch.full((cfg.num_classes,), 1.0 / cfg.num_classes, dtype=torch.float64) if label_probs is None \
            else torch.as_tensor(label_probs, dtype=torch.float64)
        per_class, maps = [], []
        for c in range(cfg.num_classes):
            logits = model_logits(model, levels, torch.full((len(levels),), c, dtype=torch.long, device=levels.device))
            nll_c = F.cross_entropy(logits.double(), levels.long(), reduction="none")
            per_class.append(-nll_c.flatten(1).sum(1))
            maps.append(nll_c)
        joint = torch.stack(per_class, 1) + prior.log().to(levels.device)[None]  # log p(c) + log p(x | c)
        out = {"log_prob": torch.logsumexp(joint, 1), "likely_class": joint.argmax(1)}
        # the per-pixel map of the most likely class's conditional
        nll = torch.stack(maps, 1)[torch.arange(len(levels), device=levels.device), out["likely_class"]]
    if per_pixel:
        out["nll_map"] = nll.mean(1) / math.log(2)
    return out


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
