import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# MNIST in torchvision's layout (MNIST/raw); this machine and CI keep it beside the checkout.
MNIST_ROOT = Path(os.environ.get("PIXELCNN_MNIST_ROOT", REPO.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    assert (MNIST_ROOT / "MNIST" / "raw").is_dir(), f"MNIST not found under {MNIST_ROOT}"
    return MNIST_ROOT


def randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Weights far from init (incl. label embeddings that start at zero), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model
