"""Masked convolutions: the causal building block of PixelCNN.

A PixelCNN predicts pixel i from pixels < i in raster order, and within a pixel R -> G -> B.
Each convolution therefore multiplies its kernel by a fixed 0/1 mask:

* spatially, the kernel sees every row above the centre and the pixels left of the centre;
* at the centre, features are split into ``data_channels`` groups (R, G, B), feature ``k`` belonging
  to group ``k % data_channels``. An output of group g sees input groups < g (mask "A") or <= g
  (mask "B"). With one data channel this reduces to: mask A cuts the centre, mask B keeps it.

The first layer uses mask A (a pixel must not see itself); every later layer mask B. The group
assignment ``k % data_channels`` matches the model's final reshape ``[B, levels * C] -> [B, levels, C]``,
so logit channel ``l * C + c`` predicts data channel c.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MASK_TYPES = ("A", "B")


def channel_groups(channels: int, data_channels: int) -> torch.Tensor:
    """Group (0 = R, 1 = G, 2 = B) of each of ``channels`` features."""
    return torch.arange(channels) % data_channels


def causal_mask(
    mask_type: str,
    out_channels: int,
    in_channels: int,
    kernel_size: int,
    data_channels: int = 1,
) -> torch.Tensor:
    """The 0/1 mask ``[out, in, k, k]`` for a causal (raster + channel ordered) convolution."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    c = kernel_size // 2
    mask = torch.zeros(out_channels, in_channels, kernel_size, kernel_size)
    mask[:, :, :c, :] = 1  # every row above the centre
    mask[:, :, c, :c] = 1  # left of the centre in the centre row
    out_group = channel_groups(out_channels, data_channels)[:, None]
    in_group = channel_groups(in_channels, data_channels)[None, :]
    centre = in_group < out_group if mask_type == "A" else in_group <= out_group
    mask[:, :, c, c] = centre.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A same-padded convolution whose kernel is multiplied by a causal mask in every forward.

    The mask is a buffer and is applied as ``weight * mask`` on the fly, never written into
    ``weight``: gradients, optimizer state, EMA copies and traced graphs all stay consistent, and the
    masked entries of ``weight`` simply receive zero gradient.
    """

    def __init__(
        self,
        mask_type: str,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        data_channels: int = 1,
        bias: bool = True,
    ):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.mask_type = mask_type
        self.data_channels = data_channels
        self.register_buffer(
            "mask", causal_mask(mask_type, out_channels, in_channels, kernel_size, data_channels),
            persistent=False,
        )

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"mask={self.mask_type}, data_channels={self.data_channels}, " + super().extra_repr()
