"""The model families and their one registry.

Contract shared by every model (training, evaluation, sampling and the jobs rely on it):

    output = model(x, labels=None)

* ``x``: float images ``[B, C, H, W]`` holding ``pixel / (levels - 1)`` (``pixel / 255`` for 8 bits);
* ``labels``: class ids ``[B]`` (long) for a conditional model (``num_classes > 0``), else ``None``;
* ``output``: the parameters of ``model.config.distribution()`` (``pixelcnn/distributions.py``), whose
  ``log_prob(output, levels)`` is log p(x_c | x_<c) per subpixel; the parameters at (c, i, j) depend only
  on pixels before (i, j) in raster order and channels before c at (i, j). PixelCNN and Gated PixelCNN:
  logits ``[B, levels, C, H, W]`` of a softmax per subpixel; PixelCNN++: ``[B, P, H, W]`` of a discretized
  logistic mixture per pixel, which does not depend on pixel (i, j) at all (the mixture orders R -> G -> B).

One file per family: ``pixelcnn.py``, ``gated.py``, ``pixelcnnpp.py``; ``common.py`` holds what they share.
No distributed or storage code lives here: parallelism and I/O are applied from outside.
"""

from __future__ import annotations

from torch import nn

from ..layers import MaskedConv2d, causal_mask
from .common import check_common, check_input, config_from, scale_input
from .gated import (
    GatedLayer, GatedPixelCNN, GatedPixelCNNConfig, StackConv2d, gate, horizontal_conv, vertical_conv,
)
from .pixelcnn import NORMS, PixelCNN, PixelCNNConfig, ResidualBlock
from .pixelcnnpp import PixelCNNpp, PixelCNNppConfig

# The one registry: the name training's --model takes -> the class. Checkpoints store the class name.
MODELS: dict[str, type[nn.Module]] = {"pixelcnn": PixelCNN, "gated": GatedPixelCNN, "pixelcnnpp": PixelCNNpp}
MODEL_CLASSES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in MODELS.values()}


def build_model(name: str, config: dict) -> nn.Module:
    """Instantiate a model class by name from a plain-dict config (as stored in checkpoints)."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[name]
    return cls(cls.config_class(**config))


__all__ = [
    "MODELS", "MODEL_CLASSES", "NORMS", "GatedLayer", "GatedPixelCNN", "GatedPixelCNNConfig", "MaskedConv2d",
    "PixelCNN", "PixelCNNConfig", "PixelCNNpp", "PixelCNNppConfig", "ResidualBlock", "StackConv2d", "build_model",
    "causal_mask", "check_common", "check_input", "config_from", "gate", "horizontal_conv", "scale_input",
    "vertical_conv",
]
