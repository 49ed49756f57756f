"""Random streams and draws: what makes sample k depend only on (model, seed, k, temperature).

Sample ``k`` of a call with ``seed`` uses its own uniforms ``u[k, p]`` (p = the raster index of
pixel-channel (i, j, c), pixel-major), a counter-based hash of (seed, k, p), never a generator's state.
Each value is drawn by inverse CDF: the smallest level whose cumulative probability exceeds ``u``. So a
sample does not depend on batch size, batch order or which sampler draws it, up to float rounding at
CDF boundaries (docs/sampling.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

SEED_RANGE = (-2**63, 2**63)  # the streams hash the seed as a 64-bit integer
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def check_seed(seed: int, name: str = "seed") -> None:
    """The one bound on seeds, for the library and every job (``name``: how the caller calls it)."""
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ValueError(f"{name} must be a 64-bit integer (-2**63 to 2**63 - 1), got {seed}")


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, ids: Sequence[int] | np.ndarray, count: int, *, stream: int = 0) -> torch.Tensor:
    """Uniforms in [0, 1), float64 ``[len(ids), count]``; row k depends only on (seed, stream, ids[k]).

    ``stream`` separates independent uses of one seed (0: pixels, 1: labels drawn per sample).
    """
    with np.errstate(over="ignore"):
        ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
        key = _mix64(np.asarray([seed], dtype=np.int64).astype(np.uint64) * _GOLDEN + np.uint64(1))
        key = _mix64(key + np.uint64(stream) * _GOLDEN)
        streams = _mix64(key ^ _mix64(ids + _GOLDEN))  # one independent stream per sample id
        counters = np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(streams[:, None] + counters[None, :])
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def derive_seed(seed: int, *counters: int) -> int:
    """A seed for torch's generators from (seed, counters...), e.g. an epoch's data order: a hash, so any
    64-bit ``seed`` gives a valid seed and different counters give unrelated streams."""
    with np.errstate(over="ignore"):
        z = _mix64(np.asarray([seed], dtype=np.int64).astype(np.uint64) * _GOLDEN + np.uint64(7))
        for counter in counters:
            z = _mix64(z ^ _mix64(np.asarray([counter], dtype=np.int64).astype(np.uint64) + _GOLDEN))
    return int(z[0] >> np.uint64(1))  # 63 bits: valid wherever torch takes a seed


def labels_for_ids(seed: int, ids: Sequence[int] | np.ndarray, probs: Sequence[float]) -> torch.Tensor:
    """One class per sample id drawn from ``probs``; label k depends only on (seed, ids[k])."""
    cdf = torch.tensor(np.cumsum(probs) / np.sum(probs), dtype=torch.float64)
    u = sample_uniforms(seed, ids, 1, stream=1)[:, 0]
    return (cdf[None, :] <= u[:, None]).sum(1).clamp_(max=len(probs) - 1)
