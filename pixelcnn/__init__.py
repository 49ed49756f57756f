"""PixelCNN: exact-likelihood autoregressive image models, with fast cached sampling.

This package knows nothing of Ray or S3: `jobs/` applies distribution and storage from outside.
"""

# Each name is imported when first used (PEP 562): a process that needs only the torch-free parts (image
# decoding, options, file writes; Ray Data's task workers) does not pay torch's import, ~2 CPU-s.
_EXPORTS = {
    "load_checkpoint": "checkpoint", "load_model": "checkpoint", "save_checkpoint": "checkpoint",
    "ImageData": "data", "load_dataset": "data",
    "CheckpointError": "errors", "DataError": "errors",
    "bits_per_dim": "likelihood", "evaluate": "likelihood",
    "GatedPixelCNN": "models", "GatedPixelCNNConfig": "models", "PixelCNN": "models", "PixelCNNConfig": "models",
    "PixelCNNpp": "models", "PixelCNNppConfig": "models",
    "Samples": "sampling", "sample": "sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
