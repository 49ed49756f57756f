"""The cached sampler's primitives: a causal conv evaluated one position (or one row) at a time over a
rolling buffer of its input rows, and a 1x1 conv at one position.

Why this is exact: every layer of these models reads, at (i, j), only raster positions <= (i, j) of the
layer below, so a value computed at (i, j) never changes once pixel (i, j) is drawn (docs/sampling.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MaskedConv2d
from ..models import StackConv2d


def pointwise_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode BatchNorm2d (or Identity) applied to features ``[B, C]`` of one position."""
    if isinstance(norm, nn.BatchNorm2d):
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    return x


class Pointwise:
    """A 1x1 masked conv at one position: ``x [B, Cin] -> [B, Cout]``."""

    def __init__(self, conv: MaskedConv2d, dtype):
        self.weight = conv.masked_weight()[:, :, 0, 0].t().to(dtype).contiguous()
        self.bias = conv.bias.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class CachedConv:
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
    def masked(cls, conv: MaskedConv2d, batch: int, width: int, dtype, device) -> "CachedConv":
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



class RowConv:
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

