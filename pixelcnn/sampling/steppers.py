"""Model steppers: the raster loop of the cached sampler, and what PixelCNN and Gated PixelCNN compute
at each step from their caches (``cache.py``; PixelCNN++'s stepper is in ``pixelcnnpp.py``). A stepper is
built for one batch size and can run any number of batches of that size; ``pixelcnn.sampling.make_stepper``
picks the one for a model (``CACHED_STEPPERS`` there).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..data import levels_to_input
from ..models import GatedPixelCNN, PixelCNN, StackConv2d, gate, scale_input
from .cache import CachedConv, Pointwise, RowConv, pointwise_norm
from ..distributions import draw


class Stepper:
    """The raster loop every cached sampler shares: pixel by pixel, channel by channel.

    A subclass sets ``input_cache`` (the cached conv that reads the image in the current row),
    ``reset(labels)`` (zero every cache, compute the label terms), ``start_row(i, levels)`` (called
    once rows < i are drawn) and ``logits_at(j)`` (logits ``[B, levels, C]`` at (current row, j),
    filling every layer's cache at j), or instead of ``logits_at`` a whole ``step``. A stepper can run
    any number of batches of its size.
    """

    cfg = None
    dtype = None
    input_cache: CachedConv

    def reset(self, labels: torch.Tensor | None) -> None:
        raise NotImplementedError

    def start_row(self, i: int, levels: torch.Tensor) -> None:
        raise NotImplementedError

    def logits_at(self, j: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def run(self, u: torch.Tensor, labels: torch.Tensor | None, temperature: float):
        self.reset(labels)
        b, height, width, channels = u.shape
        levels = torch.zeros(b, channels, height, width, dtype=torch.long, device=u.device)
        log_prob = torch.zeros(b, dtype=torch.float64, device=u.device)
        # The model's input value of each level, computed as the model computes it (so bit-identical).
        input_values = scale_input(levels_to_input(torch.arange(self.cfg.levels, device=u.device),
                                                   self.cfg.levels, self.dtype))
        for i in range(height):
            self.start_row(i, levels)
            for j in range(width):
                for c in range(channels):
                    self.step(i, j, c, u, levels, log_prob, input_values, temperature)
        return levels, log_prob

    def step(self, i, j, c, u, levels, log_prob, input_values, temperature) -> None:
        """Draw channel c of pixel (i, j) into ``levels``, add its log-prob, write it into the input buffer."""
        # Channels < c of this pixel are in the input buffer; the rest are still zero, and masked out
        # of every logit we read (features at (i, j) never see the last channel).
        level, lp = draw(self.logits_at(j)[:, :, c], u[:, i, j, c], temperature)
        levels[:, c, i, j] = level
        log_prob += lp
        self.input_cache.slots[j][:, c] = input_values.index_select(0, level)


class PixelCNNStepper(Stepper):
    def __init__(self, model: PixelCNN, batch: int, dtype, device):
        cfg = model.config
        width = cfg.image_size[1]
        self.cfg = cfg
        self.input_conv = self.input_cache = CachedConv.masked(model.input_conv, batch, width, dtype, device)
        self.input_norm = model.input_norm
        self.blocks = [
            (Pointwise(block.reduce, dtype), block.norm1, CachedConv.masked(block.conv, batch, width, dtype, device),
             block.norm2, Pointwise(block.expand, dtype), block.norm3)
            for block in model.blocks
        ]
        self.label_embeddings = [block.label_bias for block in model.blocks]
        self.label_biases = []
        self.head = [Pointwise(conv, dtype) for conv in model.head]
        self.output = Pointwise(model.output_conv, dtype)
        self.caches = [self.input_conv] + [b[2] for b in self.blocks]
        self.dtype = dtype

    def reset(self, labels: torch.Tensor | None) -> None:
        for cache in self.caches:
            cache.reset()
        # A block's class bias is added right after its 3x3 conv: fold it into that conv's row term.
        self.label_biases = [None if e is None else e(labels).to(self.dtype)[:, None] for e in self.label_embeddings]

    def start_row(self, i: int, levels: torch.Tensor) -> None:
        self.input_conv.start_row(i)
        for (_, _, conv, *_), bias in zip(self.blocks, self.label_biases):
            conv.start_row(i, bias)

    def logits_at(self, j: int) -> torch.Tensor:
        h = pointwise_norm(self.input_norm, self.input_conv(j))
        for reduce, norm1, conv, norm2, expand, norm3 in self.blocks:
            # ReLU, written straight into the 3x3 conv's input buffer at (current row, j).
            torch.clamp_min(pointwise_norm(norm1, reduce(F.relu(h))), 0, out=conv.slots[j])
            t = pointwise_norm(norm2, conv(j))
            h = h + pointwise_norm(norm3, expand(F.relu(t)))
        for conv in self.head:
            h = conv(F.relu(h))
        return self.output(F.relu(h)).view(h.shape[0], self.cfg.levels, self.cfg.in_channels)



class GatedStepper(Stepper):
    """Cached sampling for GatedPixelCNN: a row of the vertical stack at a time, a pixel of the
    horizontal stack at a time.

    What is cached, and why that is exact:

    * Vertical stack. Its features at row i depend only on rows < i (the input layer looks strictly
      above; each later vertical conv reads rows <= i of features that see only rows < i). So they are
      final once row i starts: ``start_row`` computes every layer's vertical features for the whole
      row i in one batched conv each (``RowConv``: the last d (k//2) + 1 rows of that layer's input),
      and adds the row's link term ``link(v_pre) [B, W, 2h]`` (and the class bias) to the horizontal
      conv's row term, so the horizontal stack reads it for free.
    * Horizontal stack. Its features at (i, j) read row i of the layer below at columns <= j only, so
      a value at (i, j) never changes once written. Per pixel, one column of every layer is computed
      from a one-row buffer of that layer's input (``CachedConv``, only the taps left of and at j).

    Memory: per layer the buffers hold d (k//2) + 1 rows (vertical) and one row (horizontal) of
    ``hidden`` channels, plus one row of 2 ``hidden`` link terms: O(layers x batch x channels x a few
    rows x width), never a whole image per layer.
    """

    def __init__(self, model: GatedPixelCNN, batch: int, dtype, device):
        cfg = self.cfg = model.config
        self.dtype = dtype
        width = cfg.image_size[1]
        self.input_v = RowConv(model.input_v, batch, width, dtype, device)
        self.input_cache = self._cached(model.input_h, batch, width, dtype, device)
        self.layers = []
        for layer in model.layers:
            self.layers.append(SimpleNamespace(
                v_conv=RowConv(layer.v_conv, batch, width, dtype, device),
                h_conv=self._cached(layer.h_conv, batch, width, dtype, device),
                link=layer.link, label_embedding=layer.label_bias, v_bias=None, h_bias=None,
                residual=None if layer.residual is None else Pointwise(layer.residual, dtype),
                skip=Pointwise(layer.skip, dtype),
            ))
        # The skip sum starts from all the skip convs' biases at once; each layer then adds g @ W.
        self.skip_bias = sum(layer.skip.bias for layer in self.layers)
        self.head = Pointwise(model.head, dtype)
        self.output = Pointwise(model.output_conv, dtype)

    @staticmethod
    def _cached(conv: StackConv2d, batch: int, width: int, dtype, device) -> CachedConv:
        return CachedConv(conv.masked_weight(), conv.bias, batch, width, dtype, device,
                           pad_left=conv.pad[0], dilation=conv.dilation[1])

    def reset(self, labels: torch.Tensor | None) -> None:
        self.input_v.reset()
        self.input_cache.reset()
        for layer in self.layers:
            layer.v_conv.reset()
            layer.h_conv.reset()
            if layer.label_embedding is not None:
                v_bias, h_bias = layer.label_embedding(labels).to(self.dtype).chunk(2, dim=1)
                layer.v_bias, layer.h_bias = v_bias[:, :, None, None], h_bias[:, None]

    def start_row(self, i: int, levels: torch.Tensor) -> None:
        if i:
            self.input_v.push(scale_input(levels_to_input(levels[:, :, i - 1], self.cfg.levels, self.dtype)))
        v = self.input_v()
        for layer in self.layers:
            layer.v_conv.push(v)
            v_pre = layer.v_conv()[:, :, None]  # [B, 2h, 1, W]
            link = layer.link(v_pre)[:, :, 0].transpose(1, 2)  # [B, W, 2h]
            layer.h_conv.start_row(i, link if layer.h_bias is None else link + layer.h_bias)
            if layer.v_bias is not None:
                v_pre = v_pre + layer.v_bias
            v = gate(v_pre)[:, :, 0]
        self.input_cache.start_row(i)

    def logits_at(self, j: int) -> torch.Tensor:
        h = self.layers[0].h_conv.write(j, self.input_cache(j))
        skip = None
        for layer, next_layer in zip(self.layers, self.layers[1:] + [None]):
            g = gate(layer.h_conv(j))
            if layer.residual is not None:  # h + residual(g), written straight into the next layer's buffer
                h = torch.add(h, layer.residual(g), out=next_layer.h_conv.slots[j])
            skip = torch.addmm(self.skip_bias, g, layer.skip.weight) if skip is None else skip.addmm_(g, layer.skip.weight)
        logits = self.output(F.relu(self.head(F.relu(skip))))
        return logits.view(logits.shape[0], self.cfg.levels, self.cfg.in_channels)
