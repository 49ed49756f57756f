"""The Parquet schemas the jobs write: generated samples (``SAMPLE_SCHEMA``, one row per image, PNG bytes
plus metadata) and scores (``SCORE_SCHEMA``, one row per scored image: docs/scoring.md).

Generated samples:

| column        | type                 | meaning                                                       |
|---------------|----------------------|---------------------------------------------------------------|
| id            | int64                | sample id k in 0..N-1; the image depends only on (checkpoint, seed, k, temperature, label, dtype, sampler) |
| seed          | int64                | the request's seed                                            |
| image_png     | binary               | lossless PNG of the uint8 image (grayscale "L" or "RGB")      |
| height, width, channels | int32      | image shape                                                   |
| label         | int32, nullable      | class the sample was conditioned on (null: unconditional)     |
| log_prob      | float64              | log p(image) under the model (temperature 1), nats            |
| bits_per_dim  | float64              | -log_prob / (H * W * C * ln 2)                                 |
| temperature   | float64              | softmax temperature used to draw                              |
| sampler       | string               | "cached", "naive" or "fused" (their draws part at float ties: rarely in float32, in most bfloat16 images) |
| dtype         | string               | "float32" or "bfloat16": the precision the model sampled in (and log_prob's) |
| checkpoint    | string               | URI of the checkpoint                                         |
| model_sha256  | string               | SHA-256 of the checkpoint file                                |
| created_at    | timestamp[us, UTC]   | when the row was made                                         |
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pixelcnn.images import encode_png

SAMPLE_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("image_png", pa.binary(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("channels", pa.int32(), nullable=False),
    pa.field("label", pa.int32(), nullable=True),
    pa.field("log_prob", pa.float64(), nullable=False),
    pa.field("bits_per_dim", pa.float64(), nullable=False),
    pa.field("temperature", pa.float64(), nullable=False),
    pa.field("sampler", pa.string(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("model_sha256", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


def sample_table(
    ids: np.ndarray,
    images: np.ndarray,
    log_prob: np.ndarray,
    labels: np.ndarray | None,
    *,
    seed: int,
    temperature: float,
    sampler: str,
    dtype: str,
    checkpoint: str,
    model_sha256: str,
) -> pa.Table:
    """Rows in ``SAMPLE_SCHEMA`` for a batch of samples (arrays, or CPU tensors). This module needs no torch: it
    runs in Ray Data's CPU tasks."""
    images = np.asarray(images, dtype=np.uint8)
    n, channels, height, width = images.shape
    log_prob = np.asarray(log_prob, dtype=np.float64)
    created = datetime.now(timezone.utc)
    columns = {
        "id": np.asarray(ids, dtype=np.int64),
        "seed": np.full(n, seed, dtype=np.int64),
        "image_png": [encode_png(image) for image in images],
        "height": np.full(n, height, dtype=np.int32),
        "width": np.full(n, width, dtype=np.int32),
        "channels": np.full(n, channels, dtype=np.int32),
        "label": pa.nulls(n, pa.int32()) if labels is None else np.asarray(labels).astype(np.int32),
        "log_prob": log_prob,
        "bits_per_dim": -log_prob / (channels * height * width * math.log(2)),
        "temperature": np.full(n, temperature, dtype=np.float64),
        "sampler": [sampler] * n,
        "dtype": [dtype] * n,
        "checkpoint": [checkpoint] * n,
        "model_sha256": [model_sha256] * n,
        "created_at": [created] * n,
    }
    return pa.Table.from_pydict(columns, schema=SAMPLE_SCHEMA)


SCORE_SCHEMA = pa.schema([
    pa.field("id", pa.int64(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=True),
    pa.field("label", pa.int32(), nullable=True),
    pa.field("log_prob", pa.float64(), nullable=False),
    pa.field("bits_per_dim", pa.float64(), nullable=False),
    pa.field("likely_class", pa.int32(), nullable=True),
    pa.field("nll_png", pa.binary(), nullable=True),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("channels", pa.int32(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("model_sha256", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
NLL_PNG_BITS = 16.0  # nll_png: 0..255 spans 0..16 bits per dimension (a pixel's NLL, mean over its channels)


def nll_png(nll_map: np.ndarray) -> bytes:
    """A per-pixel NLL map ``[H, W]`` in bits/dim as a grayscale PNG, on the fixed scale NLL_PNG_BITS, so
    maps of different images compare (brighter: less likely)."""
    levels = np.clip(np.rint(np.asarray(nll_map) * (255 / NLL_PNG_BITS)), 0, 255).astype(np.uint8)
    return encode_png(levels[None])


def score_table(ids, sources: list[str], rows, labels, log_prob, *, shape, likely_class=None, nll_maps=None,
                dtype: str, checkpoint: str, model_sha256: str) -> pa.Table:
    """Rows in ``SCORE_SCHEMA`` for a batch of scored images (``rows``/``labels``: None entries are nulls)."""
    channels, height, width = shape
    n = len(ids)
    log_prob = np.asarray(log_prob, dtype=np.float64)
    columns = {
        "id": np.asarray(ids, dtype=np.int64),
        "source": list(sources),
        "row": pa.array(rows, type=pa.int64()),
        "label": pa.array(labels, type=pa.int32()),
        "log_prob": log_prob,
        "bits_per_dim": -log_prob / (channels * height * width * math.log(2)),
        "likely_class": pa.nulls(n, pa.int32()) if likely_class is None else np.asarray(likely_class, dtype=np.int32),
        "nll_png": pa.nulls(n, pa.binary()) if nll_maps is None else [nll_png(m) for m in nll_maps],
        "height": np.full(n, height, dtype=np.int32),
        "width": np.full(n, width, dtype=np.int32),
        "channels": np.full(n, channels, dtype=np.int32),
        "dtype": [dtype] * n,
        "checkpoint": [checkpoint] * n,
        "model_sha256": [model_sha256] * n,
        "created_at": [datetime.now(timezone.utc)] * n,
    }
    return pa.Table.from_pydict(columns, schema=SCORE_SCHEMA)
