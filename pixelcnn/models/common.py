"""What every model family shares: the config checks, the input scaling and the input checks."""

from __future__ import annotations

import torch


def check_common(cfg) -> None:
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


def config_from(model_class, config, overrides: dict):
    """A model's config: the one given, or its config class built from keyword overrides (not both)."""
    if config is not None and overrides:
        raise TypeError("pass either a config or keyword overrides, not both")
    return config if config is not None else model_class.config_class(**overrides)


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
