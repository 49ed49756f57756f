"""CUDA graphs for the cached and fused samplers: the whole loop over an image, captured once per batch
shape and replayed per batch.

On a GPU the cached step is over a hundred tiny kernels per pixel (reference model), so its speed is set
by launch overhead, not arithmetic. The loop has fixed shapes and fixed indices, so it is captured as one
graph the second time a batch shape is seen and replayed from then on: one launch per batch instead of
~10^5. The graph runs exactly the kernels of the eager loop on the same inputs, so it draws the same
images (a test on a GPU checks this).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from .steppers import Stepper


class GraphedRun:
    """A stepper's loop for one batch shape, captured as one CUDA graph.

    Static inputs ``u`` and ``labels`` are copied in before each replay; the stepper's caches are
    zeroed inside the graph (``Stepper.run`` starts with ``reset``), so every replay starts clean.
    The graph reads the model's weights as they were at capture: some as copies (the masked conv
    weights rearranged per tap, the summed skip biases), some in place (biases, norms, label
    embeddings), hence ``GraphCache``.
    """

    def __init__(self, stepper: Stepper, u, labels, temperature):
        self.stepper = stepper
        self.u = u.clone()
        self.labels = None if labels is None else labels.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.stepper.run(self.u, self.labels, temperature)

    def __call__(self, u, labels):
        self.u.copy_(u)
        if labels is not None:
            self.labels.copy_(labels)
        self.graph.replay()
        return self.out[0].clone(), self.out[1].clone()


class GraphCache:
    """One model's captured graphs, valid while its weights are the ones they were captured with.

    ``runs`` maps a run's key (shape, temperature, dtype, device, unconditional, sampler, precision
    settings) to a ``GraphedRun``, to None (seen once: a shape is captured the second time it is seen, so
    a one-off batch never pays for a capture) or to "eager" (its capture failed). Valid means every
    parameter and buffer has the same storage and the same values as at capture: values are compared,
    not version counters, because some in-place writes (``.data``, fused optimizers) leave the counter
    alone. ``held`` keeps the captured storages alive, so a new tensor can never reuse an address the
    graphs read.
    """

    MAX_SHAPES = 4

    def __init__(self, weights: list):
        self.held = weights
        self.values = [t.clone() for t in weights]
        self.runs: dict = {}

    def valid_for(self, weights: list) -> bool:
        return len(weights) == len(self.held) and all(
            h.device == t.device and h.dtype == t.dtype and h.shape == t.shape and h.data_ptr() == t.data_ptr()
            and torch.equal(v, t)
            for h, v, t in zip(self.held, self.values, weights)
        )


GRAPHS: "weakref.WeakKeyDictionary[nn.Module, GraphCache]" = weakref.WeakKeyDictionary()


def precision_settings() -> tuple:
    """torch's float32 precision (TF32) and autocast settings, as far as this torch can read them. A graph
    replays the kernels chosen when it was captured, so one captured under other settings is not reused."""
    readings = [torch.is_autocast_enabled()]
    for read in (lambda: torch.backends.cuda.matmul.fp32_precision, lambda: torch.backends.cuda.matmul.allow_tf32,
                 lambda: torch.backends.cudnn.conv.fp32_precision, lambda: torch.backends.cudnn.allow_tf32):
        try:
            readings.append(read())
        except (AttributeError, RuntimeError):  # not in this torch; or a legacy flag after the new setting
            readings.append(None)
    return tuple(readings)


def run_graphed(model: nn.Module, u, labels, temperature: float, sampler: str,
                new_stepper: Callable[[], Stepper]):
    """``new_stepper().run(u, labels, temperature)``, from a CUDA graph once this batch shape repeats."""
    weights = [t.detach() for t in (*model.parameters(), *model.buffers())]
    cache = GRAPHS.get(model)
    if cache is None or not cache.valid_for(weights):
        cache = GRAPHS[model] = GraphCache(weights)
    key = (u.shape, temperature, next(model.parameters()).dtype, u.device, labels is None, sampler,
           precision_settings())
    if key not in cache.runs:  # first sight: run eagerly, capture next time
        if len(cache.runs) >= cache.MAX_SHAPES:
            cache.runs.pop(next(iter(cache.runs)))  # the oldest shape, and its graph's memory
        cache.runs[key] = None
        return new_stepper().run(u, labels, temperature)
    run = cache.runs[key]
    if isinstance(run, GraphedRun):
        with torch.cuda.device(u.device):
            return run(u, labels)
    if run == "eager":
        return new_stepper().run(u, labels, temperature)
    with torch.cuda.device(u.device):  # second sight: capture
        # Warm up on a side stream first (PyTorch's recipe for capture): cuBLAS handles and
        # workspaces are made outside the graph. This run's result is the current batch's.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = new_stepper().run(u, labels, temperature)
        torch.cuda.current_stream().wait_stream(side)
        try:
            cache.runs[key] = GraphedRun(new_stepper(), u, labels, temperature)
        except RuntimeError:  # e.g. no memory left for the graph's pool: stay eager for this shape
            cache.runs[key] = "eager"
    return result
