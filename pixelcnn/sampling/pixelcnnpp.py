"""Cached sampling for PixelCNN++, after Fast PixelCNN++ (Ramachandran et al. 2017, arXiv 1704.06001):
every layer is computed once per position, at the step where the position's inputs are final, at its own
resolution.

Why this is exact. In the full forward pass (``models/pixelcnnpp.py``):

* ``u`` features at row r (any resolution) see only full-resolution rows above r's first full row. So
  a whole row of them is final once that row starts: at full row i, ``start_row`` computes row i of
  every full-resolution ``u`` layer, at even i row i/2 of the half-resolution ones, at i % 4 == 0 row
  i/4 of the quarter ones (up and down pass), one batched conv per layer and row.
* ``ul`` features at (r, c) see only pixels strictly before that position's first full pixel. So at
  pixel (i, j) the step computes one column of every full-resolution ``ul`` layer; with i and j both
  even also position (i/2, j/2) of the half-resolution layers, with both multiples of 4 position
  (i/4, j/4) of the quarter ones. A stride-2 conv at (i/2, j/2) reads full rows i - 1, i up to column
  j, and the transposed convs at (i, j) read low-resolution (i // 2, j // 2), computed at pixel
  (i - i % 2, j - j % 2), at or before (i, j).
  Within a step, resolutions run in the forward pass's order: full up, 1/2 up, 1/4 up and down,
  1/2 down, full down.

Each value is computed from the same inputs as in the forward pass, so it is the forward pass's value
(up to the order of float sums); the tests draw the naive sampler's images in float64.

Memory. Each conv keeps only the rows its kernel reaches (two rows of its input, at its resolution;
the image three), each transposed conv one row of its input: O(layers x batch x channels x width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.pixelcnnpp import LEVELS, GatedResnet, PixelCNNpp, ShiftedConv2d, ShiftedDeconv2d, concat_elu
from .steppers import Stepper


class Rows:
    """The newest ``rows`` rows of a feature map at one resolution, zero-padded by one column on each side:
    ``buffer [B, C, rows, W + 2]``, the current row last. Rows above the image stay zero."""

    def __init__(self, batch: int, channels: int, rows: int, width: int, dtype, device):
        self.buffer = torch.zeros(batch, channels, rows, width + 2, dtype=dtype, device=device)
        self.width = width

    def reset(self) -> None:
        self.buffer.zero_()

    def roll(self) -> None:
        """A new row starts: every row moves up one, the new current row is zero."""
        self.buffer[:, :, :-1] = self.buffer[:, :, 1:].clone()
        self.buffer[:, :, -1].zero_()

    def write(self, j: int, value: torch.Tensor) -> None:
        self.buffer[:, :, -1, j + 1] = value

    def write_row(self, value: torch.Tensor) -> None:
        self.buffer[:, :, -1, 1:self.width + 1] = value


class ConvAt:
    """A ``ShiftedConv2d`` evaluated from a ``Rows`` buffer of its input: at one output column (a matrix
    product with the window flattened) or over a whole output row (a conv over the buffer's rows).
    ``skip`` newest rows are left out: the input convs read the image rows above the current one."""

    def __init__(self, conv: ShiftedConv2d, dtype, skip: int = 0):
        self.weight = conv.weight.detach().to(dtype)
        self.matrix = self.weight.flatten(1).t().contiguous()  # [Cin kh kw, Cout], matching the window's order
        self.bias = conv.bias.detach().to(dtype)
        self.kh, self.kw = conv.kernel_size
        self.stride = conv.stride[1]
        self.first = 1 - conv.pad[0]  # buffer column of output column 0's first tap
        self.skip = skip

    def _rows(self, rows: Rows) -> torch.Tensor:
        end = rows.buffer.shape[2] - self.skip
        return rows.buffer[:, :, end - self.kh:end]

    def at(self, rows: Rows, j: int) -> torch.Tensor:
        start = self.stride * j + self.first
        window = self._rows(rows)[:, :, :, start:start + self.kw]
        return torch.addmm(self.bias, window.reshape(window.shape[0], -1), self.matrix)

    def row(self, rows: Rows, width: int) -> torch.Tensor:
        window = self._rows(rows)[:, :, :, self.first:]
        return F.conv2d(window, self.weight, self.bias, stride=(1, self.stride))[:, :, 0, :width]


class DeconvAt:
    """A ``ShiftedDeconv2d`` evaluated from its input's current row: output row r reads only kernel row
    r % 2; output column c of the down-right-shifted one reads only input column c // 2, tap c % 2."""

    def __init__(self, deconv: ShiftedDeconv2d, dtype):
        self.weight = deconv.weight.detach().to(dtype)  # [Cin, Cout, 2, kw]
        self.bias = deconv.bias.detach().to(dtype)
        self.left = 1 if deconv.right else 0
        self.taps = [[self.weight[:, :, r, c].contiguous() for c in range(self.weight.shape[3])] for r in range(2)]

    def at(self, low_row: torch.Tensor, r: int, c: int) -> torch.Tensor:
        """Down-right-shifted only: output (r, c) from ``low_row [B, Cin, W_low]`` (row r // 2)."""
        return torch.addmm(self.bias, low_row[:, :, c // 2], self.taps[r % 2][c % 2])

    def row(self, low_row: torch.Tensor, r: int, width: int) -> torch.Tensor:
        out = F.conv_transpose2d(low_row[:, :, None], self.weight[:, :, r % 2:r % 2 + 1], self.bias, stride=(1, 2))
        return out[:, :, 0, self.left:self.left + width]


class BlockAt:
    """A ``GatedResnet`` evaluated a row (``u`` stream) or a pixel (``ul`` stream) at a time, with the two
    rows its convs reach of conv1's input concat_elu(x) and of conv2's input concat_elu(c1)."""

    def __init__(self, block: GatedResnet, batch: int, width: int, dtype, device):
        f = block.conv1.out_channels
        self.in1 = Rows(batch, 2 * f, 2, width, dtype, device)
        self.in2 = Rows(batch, 2 * f, 2, width, dtype, device)
        self.conv1, self.conv2 = ConvAt(block.conv1, dtype), ConvAt(block.conv2, dtype)
        self.aux = block.aux is not None  # a 1x1 conv of the aux input: a product per pixel, a conv1d per row
        if self.aux:
            self.aux_weight = block.aux.weight.detach()[:, :, :, 0].to(dtype)  # [f, A, 1]
            self.aux_matrix = self.aux_weight[:, :, 0].t().contiguous()
            self.aux_bias = block.aux.bias.detach().to(dtype)
        self.label_embedding = block.label_bias
        self.label_bias = None
        self.dtype = dtype

    def reset(self, labels) -> None:
        self.in1.reset()
        self.in2.reset()
        if self.label_embedding is not None:
            self.label_bias = self.label_embedding(labels).to(self.dtype)  # [B, 2f]

    def roll(self) -> None:
        self.in1.roll()
        self.in2.roll()

    def _gate(self, x, c2, bias):
        if bias is not None:
            c2 = c2 + bias
        a, b = c2.chunk(2, 1)
        return x + a * torch.sigmoid(b)

    def pixel(self, j: int, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """Output at column j of the current row from x ``[B, f]`` (and aux ``[B, A]``) there."""
        self.in1.write(j, concat_elu(x))
        c1 = self.conv1.at(self.in1, j)
        if aux is not None:
            c1 = c1 + torch.addmm(self.aux_bias, concat_elu(aux), self.aux_matrix)
        self.in2.write(j, concat_elu(c1))
        return self._gate(x, self.conv2.at(self.in2, j), self.label_bias)

    def row(self, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """The current row's output from x ``[B, f, W]`` (and aux ``[B, A, W]``)."""
        width = x.shape[-1]
        self.in1.write_row(concat_elu(x))
        c1 = self.conv1.row(self.in1, width)
        if aux is not None:
            c1 = c1 + F.conv1d(concat_elu(aux), self.aux_weight, self.aux_bias)
        self.in2.write_row(concat_elu(c1))
        bias = None if self.label_bias is None else self.label_bias[:, :, None]
        return self._gate(x, self.conv2.row(self.in2, width), bias)


class PixelCNNppStepper(Stepper):
    """Cached sampling for ``PixelCNNpp``: rows of ``u`` at each row start, one position of ``ul`` per
    resolution at each pixel, then the pixel's channels drawn from the mixture one by one (G's
    distribution computed after R is drawn, B's after G)."""

    def __init__(self, model: PixelCNNpp, batch: int, dtype, device):
        cfg = self.cfg = model.config
        self.dtype = dtype
        self.distribution = cfg.distribution()
        widths = [w for _, w in cfg.sizes()]
        f = cfg.nr_filters

        def blocks(modules, level):
            return [BlockAt(block, batch, widths[level], dtype, device) for block in modules]

        # The image, scaled as the model scales it, plus the ones channel: rows i - 2, i - 1, i.
        self.x = Rows(batch, cfg.in_channels + 1, 3, widths[0], dtype, device)
        self.u_input = ConvAt(model.u_input, dtype, skip=1)  # down-shifted: reads rows i - 2, i - 1
        self.ul_input_up = ConvAt(model.ul_input_up, dtype, skip=1)  # down-shifted: reads row i - 1
        self.ul_input_left = ConvAt(model.ul_input_left, dtype)  # right-shifted: read at column j - 1
        self.up_u = [blocks(model.up_u[level], level) for level in range(LEVELS)]
        self.up_ul = [blocks(model.up_ul[level], level) for level in range(LEVELS)]
        self.down_u = [blocks(model.down_u[level], level) for level in range(LEVELS)]
        self.down_ul = [blocks(model.down_ul[level], level) for level in range(LEVELS)]
        # stride-2 convs: level l -> l + 1, each with the last two rows of its input at level l
        self.downsize_u = [ConvAt(conv, dtype) for conv in model.downsize_u]
        self.downsize_ul = [ConvAt(conv, dtype) for conv in model.downsize_ul]
        self.downsize_u_in = [Rows(batch, f, 2, widths[level], dtype, device) for level in range(LEVELS - 1)]
        self.downsize_ul_in = [Rows(batch, f, 2, widths[level], dtype, device) for level in range(LEVELS - 1)]
        # transposed convs: level l + 1 -> l, each reading the last down-pass features of level l + 1's row
        self.upsize_u = [DeconvAt(deconv, dtype) for deconv in model.upsize_u]
        self.upsize_ul = [DeconvAt(deconv, dtype) for deconv in model.upsize_ul]
        self.ul_final = [torch.zeros(batch, f, widths[level], dtype=dtype, device=device) for level in range(LEVELS)]
        self.out_matrix = model.output.weight.detach()[:, :, 0, 0].t().to(dtype).contiguous()
        self.out_bias = model.output.bias.detach().to(dtype)
        self.zeros = torch.zeros(batch, f, dtype=dtype, device=device)
        self.widths = widths
        # Per level: the current row's u features (up pass: the first features, then each block's; down
        # pass: each block's) and its last down-pass features; the ul input's term from the row above; the
        # current position's ul up-pass features (the down pass's skips).
        self.u_up: list = [None] * LEVELS
        self.u_down: list = [None] * LEVELS
        self.u_final: list = [None] * LEVELS
        self.ul_up_term = None
        self.ul_up: list = [None] * LEVELS
        self.pixel = None

    def _level_buffers(self, level: int):
        for blocks in (self.up_u, self.up_ul, self.down_u, self.down_ul):
            yield from blocks[level]
        if level < LEVELS - 1:
            yield self.downsize_u_in[level]
            yield self.downsize_ul_in[level]

    def reset(self, labels: torch.Tensor | None) -> None:
        self.x.reset()
        for level in range(LEVELS):
            for buffer in self._level_buffers(level):
                if isinstance(buffer, BlockAt):
                    buffer.reset(labels)
                else:
                    buffer.reset()
            self.ul_final[level].zero_()

    def start_row(self, i: int, levels: torch.Tensor) -> None:
        starting = [level for level in range(LEVELS) if i % (1 << level) == 0]  # levels whose row i >> l starts
        self.x.roll()
        self.x.buffer[:, -1, -1, 1:-1] = 1  # the ones channel of the new row (the row's pixels are written as drawn)
        for level in starting:
            for buffer in self._level_buffers(level):
                buffer.roll()
        width = self.widths[0]
        # Up pass, full resolution: the down-shifted input conv reads rows i - 2, i - 1 (row 0: the shift's zeros).
        u = self.u_input.row(self.x, width) if i else self.zeros[:, :, None].expand(-1, -1, width)
        self.ul_up_term = self.ul_input_up.row(self.x, width) if i else None
        self._u_up(0, u)
        for level in starting[1:]:
            self._u_up(level, self.downsize_u[level - 1].row(self.downsize_u_in[level - 1], self.widths[level]))
        for level in reversed(starting):  # down pass, lowest resolution first
            skips = list(self.u_up[level])
            if level == LEVELS - 1:
                u = skips.pop()
            else:
                u = self.upsize_u[level].row(self.u_final[level + 1], i >> level, self.widths[level])
            downs = []
            for block in self.down_u[level]:
                u = block.row(u, skips.pop())
                downs.append(u)
            self.u_down[level], self.u_final[level] = downs, u

    def _u_up(self, level: int, u: torch.Tensor) -> None:
        ups = [u]
        for block in self.up_u[level]:
            u = block.row(u, None)
            ups.append(u)
        self.u_up[level] = ups
        if level < LEVELS - 1:
            self.downsize_u_in[level].write_row(u)

    def _ul_up(self, level: int, j: int, ul: torch.Tensor) -> None:
        ups = [ul]
        for block, u in zip(self.up_ul[level], self.u_up[level][1:]):
            ul = block.pixel(j, ul, u[:, :, j])
            ups.append(ul)
        self.ul_up[level] = ups
        if level < LEVELS - 1:
            self.downsize_ul_in[level].write(j, ul)

    def pixel_params(self, i: int, j: int) -> torch.Tensor:
        """The mixture's parameters ``[B, P]`` at (i, j), computing every ``ul`` position that becomes final."""
        here = [level for level in range(LEVELS) if i % (1 << level) == 0 and j % (1 << level) == 0]
        ul = self.zeros if self.ul_up_term is None else self.ul_up_term[:, :, j]
        if j:
            ul = ul + self.ul_input_left.at(self.x, j - 1)
        self._ul_up(0, j, ul)
        for level in here[1:]:
            self._ul_up(level, j >> level, self.downsize_ul[level - 1].at(self.downsize_ul_in[level - 1], j >> level))
        for level in reversed(here):
            jl = j >> level
            skips = list(self.ul_up[level])
            if level == LEVELS - 1:
                ul = skips.pop()
            else:
                ul = self.upsize_ul[level].at(self.ul_final[level + 1], i >> level, jl)
            for block, u in zip(self.down_ul[level], self.u_down[level]):
                ul = block.pixel(jl, ul, torch.cat([u[:, :, jl], skips.pop()], 1))
            if level:  # read by the transposed conv up to level - 1
                self.ul_final[level][:, :, jl] = ul
        return torch.addmm(self.out_bias, F.elu(ul), self.out_matrix)

    def step(self, i, j, c, u, levels, log_prob, input_values, temperature) -> None:
        # The network's output at (i, j) does not depend on pixel (i, j): computed once, before R is drawn.
        if c == 0:
            self.pixel = self.pixel_params(i, j)
        level, lp = self.distribution.sample(self.pixel, levels[:, :, i, j], c, u[:, i, j, c], temperature)
        levels[:, c, i, j] = level
        log_prob += lp
        self.x.buffer[:, c, -1, j + 1] = input_values.index_select(0, level)
