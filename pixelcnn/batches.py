"""The training data as batches: one interface (``Batches``) that the loop reads, and its in-memory
implementation. ``jobs/train.py`` has the other, streamed through Ray Data.

What a step computes does not depend on the number of workers: ``--batch-size`` is the global batch and
each worker takes its share of it (shares differ by at most one image). With the data in memory the
batches are a function of (seed, epoch, step) alone, so a run that changes its worker count (elastic
training, a resume on another cluster) continues exactly as if it had not.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Iterator, NamedTuple, Protocol

import torch

from .config import TrainConfig
from .data import ImageData, load_dataset
from .sampling.streams import derive_seed


def load_split(cfg: TrainConfig, train: bool, **kwargs) -> ImageData:
    """The training or test split of ``cfg``'s data, in memory (``kwargs``: e.g. a filesystem)."""
    if cfg.own_images and not train and cfg.test_dataset:
        return load_dataset(cfg.test_dataset, train=True, subset=cfg.test_subset, **kwargs,
                            **asdict(cfg.image_options(test_fraction=0)))
    if cfg.own_images:
        options = cfg.image_options(test_fraction=0 if cfg.test_dataset else None)
        return load_dataset(cfg.dataset, train=train, subset=cfg.subset if train else cfg.test_subset, **kwargs,
                            **asdict(options))
    return load_dataset(cfg.dataset, cfg.data_dir, train=train, subset=cfg.subset if train else cfg.test_subset,
                        download=cfg.download)



class Batch(NamedTuple):
    levels: torch.Tensor  # uint8 [n, C, H, W]: this worker's share of the global batch
    labels: torch.Tensor  # int64 [n]
    total: int  # images in the global batch (every worker's shares together)


class Batches(Protocol):
    """What the training loop reads: one epoch's batches at a time, from a step within it."""

    steps_per_epoch: int
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # classes of the labels (0: none)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...


class InMemoryBatches:
    """Exact batches from data held in memory: a function of (seed, epoch, step) and the worker's rank.

    Epoch e is a permutation seeded by (seed, e), cut into global batches of ``batch_size``, the last one
    short (so each image is trained on once per epoch); worker r of w takes images ``r n // w`` to
    ``(r + 1) n // w`` of each global batch of n.
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int, rank: int, world_size: int, device):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        # Small datasets live on the device: no loader, no host->device copies in the loop.
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.steps_per_epoch = math.ceil(len(data) / batch_size)
        self.shape, self.num_classes = data.shape, data.num_classes

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(derive_seed(self.seed, 1, epoch)))
        order = order.to(self.images.device)
        for step in range(start, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            n = len(batch)
            share = batch[self.rank * n // self.world_size:(self.rank + 1) * n // self.world_size]
            yield Batch(self.images[share], self.labels[share], n)
