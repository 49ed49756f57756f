"""PixelCNN: exact-likelihood autoregressive image models, with fast cached sampling.

This package knows nothing of Ray or S3: `jobs/` applies distribution and storage from outside.
"""

from .checkpoint import load_checkpoint, load_model, save_checkpoint
from .data import ImageData, load_dataset
from .errors import CheckpointError, DataError
from .likelihood import bits_per_dim, evaluate
from .models import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig, PixelCNNpp, PixelCNNppConfig
from .sampling import Samples, sample

__all__ = [
    "CheckpointError", "DataError", "GatedPixelCNN", "GatedPixelCNNConfig", "ImageData", "PixelCNN", "PixelCNNConfig",
    "PixelCNNpp", "PixelCNNppConfig", "Samples",
    "bits_per_dim", "evaluate", "load_checkpoint", "load_dataset", "load_model", "sample", "save_checkpoint",
]
