"""The naive sampler: one full forward pass per pixel and channel, H*W*C passes per batch. It is slow and
obviously right, the oracle every faster sampler is tested against."""

from __future__ import annotations

import torch

from ..data import levels_to_input


def sample_naive(model, u: torch.Tensor, labels, temperature: float):
    """Draw a batch from uniforms ``u [B, H, W, C]``: (levels long [B, C, H, W], log_prob float64 [B])."""
    b, height, width, channels = u.shape
    cfg = model.config
    distribution = cfg.distribution()
    dtype = next(model.parameters()).dtype
    levels = torch.zeros(b, channels, height, width, dtype=torch.long, device=u.device)
    log_prob = torch.zeros(b, dtype=torch.float64, device=u.device)
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                params = model(levels_to_input(levels, cfg.levels, dtype), labels)
                level, lp = distribution.sample(params[..., i, j], levels[:, :, i, j], c, u[:, i, j, c], temperature)
                levels[:, c, i, j] = level
                log_prob += lp
    return levels, log_prob
