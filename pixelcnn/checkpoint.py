"""Self-describing checkpoints: one ``.pt`` file that rebuilds the model on its own.

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(..., weights_only=True)``
loads it without executing any pickled code:

    format         "pixelcnn-checkpoint/1"
    model_class    "PixelCNN" | "GatedPixelCNN" | "PixelCNNpp" -> models.MODEL_CLASSES
    model_config   dict of the model's config dataclass
    model_state    state_dict (weights used for sampling/evaluation; EMA weights when trained with EMA)
    data_shape     [C, H, W] of the training images
    dataset        dataset name
    step, epoch    training progress: optimizer steps and whole epochs done
    training       optional resume state (raw weights, optimizer, ...), ignored by load_model

Files are written whole (``files.write_atomically``), so a crash never leaves a half-written checkpoint
under the final name.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import asdict

import torch
from torch import nn

from .errors import CheckpointError, one_line
from .files import MODEL_FILE, write_atomically
from .models import MODEL_CLASSES, build_model

FORMAT = "pixelcnn-checkpoint/1"
REQUIRED = ("format", "model_class", "model_config", "model_state", "data_shape", "step")


def checkpoint_dict(model: nn.Module, *, step: int, epoch: int = 0, dataset: str = "", training=None) -> dict:
    cfg = model.config
    return {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "model_config": asdict(cfg),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data_shape": [cfg.in_channels, *cfg.image_size],
        "dataset": dataset,
        "step": int(step),
        "epoch": int(epoch),
        "training": training,
    }


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write ``checkpoint`` (see ``checkpoint_dict``) to ``path`` atomically."""
    write_atomically(path, lambda f: torch.save(checkpoint, f))


def resolve_checkpoint_path(path: str | os.PathLike) -> str:
    """A checkpoint file, or a folder holding ``model.pt`` (a checkpoint or run folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _load_error(error: Exception) -> str:
    """torch.load's reason, in one line. Its weights-only refusal comes with advice to load the file
    unsafely or to allowlist what it refused, which is not ours to pass on: keep only what it refused."""
    if not isinstance(error, (RuntimeError, pickle.UnpicklingError)):
        # The unpickler tripped over bytes it could not parse (EOFError, KeyError: 101, ...): its words are
        # about its own internals, not the file.
        return "not a file torch.save wrote"
    text = one_line(error, limit=10_000)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        detail = detail.split(". ", 1)[0].strip().rstrip(".")
        return f"refused by the weights-only loader: {detail[:200] or 'unsupported content'}"
    first = text.split(". ", 1)[0].rstrip(".")  # torch's own advice follows its first sentence
    return first[:200] or type(error).__name__


def load_checkpoint(source: str | os.PathLike | bytes, *, name: str | None = None, map_location="cpu") -> dict:
    """Load and validate a checkpoint dict from a file, a folder holding ``model.pt``, or its bytes.

    ``weights_only=True``: no code runs from the file. ``name`` labels errors (default: the path).
    """
    if isinstance(source, (bytes, bytearray)):
        name = name or "checkpoint"
        source = io.BytesIO(source)
    else:
        source = resolve_checkpoint_path(source)
        name = name or source
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, random bytes, a foreign pickle, ...
        raise CheckpointError(f"checkpoint {name} is corrupt or not a PixelCNN checkpoint ({_load_error(error)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {name} is not a PixelCNN checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {name} lacks {', '.join(missing)}")
    if not isinstance(ckpt["model_class"], str) or ckpt["model_class"] not in MODEL_CLASSES:
        raise CheckpointError(f"checkpoint {name} holds unknown model class {ckpt['model_class']!r}")
    return ckpt


def model_from_checkpoint(ckpt: dict, *, data_shape=None, source: str = "checkpoint") -> nn.Module:
    """Rebuild the model of a loaded checkpoint dict, in eval mode."""
    if data_shape is not None and list(data_shape) != list(ckpt["data_shape"]):
        raise CheckpointError(
            f"{source} was trained on images {list(ckpt['data_shape'])} (C, H, W), not {list(data_shape)}"
        )
    try:
        model = build_model(ckpt["model_class"], ckpt["model_config"])
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, TypeError, ValueError) as error:
        # load_state_dict lists every mismatch over many lines: name the first one.
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line or "key" in line), lines[0] if lines else "")
        raise CheckpointError(f"{source} does not match its model config ({detail[:160]})") from None
    return model.eval()


def load_model(path: str | os.PathLike, *, device="cpu", data_shape=None) -> nn.Module:
    """Rebuild a trained model from a checkpoint file or folder, in eval mode on ``device``.

    ``data_shape`` (C, H, W), if given, must equal the shape the model was trained on.
    """
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, data_shape=data_shape, source=f"checkpoint {os.fspath(path)}").to(device)
