"""Negative log-likelihood and bits per dimension, for every model family.

A model's output parameterises its distribution (``model.config.distribution()``, ``distributions.py``):
a softmax per subpixel or PixelCNN++'s logistic mixture. Everything here goes through that distribution's
``log_prob``, so the figures are exact for both and comparable across them.

Training minimises the mean NLL per dimension (nats); evaluation reports the exact test-set figure: the
sum of per-subpixel NLL over every image and channel, divided by (dims x ln 2). Sums are accumulated in
float64 over every batch (no dropped last batch), so the figure does not depend on the batch size.
"""

from __future__ import annotations

import math

import torch

from .data import ImageData, levels_to_input
from .distributions import Categorical


def config_of(model):
    """The config of a model, or of the one a DDP wrapper holds."""
    return model.config if hasattr(model, "config") else model.module.config


def distribution_of(model):
    """The distribution a model's output parameterises (through a DDP wrapper too)."""
    return config_of(model).distribution()


def model_logits(model, levels: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The model's output for integer images (softmax logits ``[B, L, C, H, W]``, or its distribution's
    parameters); labels are passed only to conditional models."""
    cfg = config_of(model)
    x = levels_to_input(levels, cfg.levels, next(model.parameters()).dtype)
    return model(x, labels if cfg.num_classes else None)


def nll_map(output: torch.Tensor, levels: torch.Tensor, distribution=None) -> torch.Tensor:
    """``-log p(x_c | x_<c)`` of every subpixel, nats, float64 ``[B, C, H, W]``. ``distribution``: the model's
    (``distribution_of(model)``); None means the softmax, ``output`` being its logits."""
    distribution = Categorical(output.shape[1]) if distribution is None else distribution
    return -distribution.log_prob(output.double(), levels.long())


def nll_per_image(output: torch.Tensor, levels: torch.Tensor, distribution=None) -> torch.Tensor:
    """Sum over pixels and channels of ``-log p(x)``, in nats, one value per image (float64)."""
    return nll_map(output, levels, distribution).flatten(1).sum(1)


def loss_per_dim(output: torch.Tensor, levels: torch.Tensor, distribution=None) -> torch.Tensor:
    """Training loss: mean NLL per dimension, in nats (float32, or the output's dtype if wider)."""
    distribution = Categorical(output.shape[1]) if distribution is None else distribution
    return -distribution.log_prob(output.to(torch.promote_types(output.dtype, torch.float32)), levels.long()).mean()


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
    distribution = distribution_of(model)
    if not cfg.num_classes or labels is not None:
        nll = nll_map(model_logits(model, levels, labels), levels, distribution)  # [B, C, H, W]
        out = {"log_prob": -nll.flatten(1).sum(1)}
    else:
        prior = torch.full((cfg.num_classes,), 1.0 / cfg.num_classes, dtype=torch.float64) if label_probs is None \
            else torch.as_tensor(label_probs, dtype=torch.float64)
        per_class, maps = [], []
        for c in range(cfg.num_classes):
            output = model_logits(model, levels, torch.full((len(levels),), c, dtype=torch.long, device=levels.device))
            nll_c = nll_map(output, levels, distribution)
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
            total += float(nll_per_image(model_logits(model, levels, labels), levels, distribution_of(model)).sum())
    finally:
        model.train(was_training)
    dims = math.prod(data.shape)
    return {
        "bits_per_dim": bits_per_dim(total, len(data), dims),
        "nll_nats_per_image": total / len(data),
        "images": len(data),
    }
