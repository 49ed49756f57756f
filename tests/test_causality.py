"""Causality proven by gradients (float64): the logits at (row, col, channel) have zero gradient with
respect to the input at their own and every later raster position / channel, and nonzero gradient
somewhere earlier. Also measures PixelCNN's blind spot (earlier pixels with no influence)."""

import pytest
import torch

from conftest import randomize
from pixelcnn import PixelCNN


def input_jacobian_support(model, shape, *, trials=1, seed=0, batch_independent=True):
    """``influence[c, i, j]`` = bool ``[C, H, W]``: does the input affect the logits at (c, i, j)?

    The union over ``trials`` random inputs, so a ReLU that happens to be off does not hide a path.
    """
    channels, height, width = shape
    influence = torch.zeros(channels, height, width, channels, height, width, dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    for _ in range(trials):
        x = torch.rand(2, *shape, generator=g, dtype=torch.float64, requires_grad=True)
        logits = model(x)  # [2, L, C, H, W]
        for c in range(channels):
            for i in range(height):
                for j in range(width):
                    (grad,) = torch.autograd.grad(logits[0, :, c, i, j].sum(), x, retain_graph=True)
                    influence[c, i, j] |= grad[0] != 0
                    if batch_independent:
                        assert torch.all(grad[1] == 0), "samples in a batch must not influence each other"
    return influence


def raster_order(shape):
    """Position of every (c, i, j) in the generation order: pixel-major, then R, G, B."""
    channels, height, width = shape
    c = torch.arange(channels)[:, None, None]
    i = torch.arange(height)[None, :, None]
    j = torch.arange(width)[None, None, :]
    return (i * width + j) * channels + c


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_depend_only_on_earlier_pixels_and_channels(channels, mode):
    torch.manual_seed(0)
    shape = (channels, 6, 5)
    model = randomize(PixelCNN(in_channels=channels, image_size=shape[1:], hidden=12, blocks=2).double())
    model.train(mode == "train")
    influence = input_jacobian_support(model, shape)
    order = raster_order(shape)
    for c in range(channels):
        for i in range(shape[1]):
            for j in range(shape[2]):
                own = order[c, i, j]
                seen = influence[c, i, j]
                assert not seen[order >= own].any(), f"logit ({c},{i},{j}) sees itself or the future"
                if own > 0:
                    assert seen[order < own].any(), f"logit ({c},{i},{j}) sees nothing earlier"


def test_rgb_channel_ordering_within_a_pixel():
    shape = (3, 4, 4)
    model = randomize(PixelCNN(in_channels=3, image_size=shape[1:], hidden=12, blocks=1).double())
    influence = input_jacobian_support(model, shape)
    i, j = 2, 1
    # R sees no channel of its own pixel, G sees R, B sees R and G.
    assert influence[0, i, j, :, i, j].tolist() == [False, False, False]
    assert influence[1, i, j, :, i, j].tolist() == [True, False, False]
    assert influence[2, i, j, :, i, j].tolist() == [True, True, False]


def test_batchnorm_in_train_mode_leaks_future_pixels():
    """Why norm='none' is the default: BatchNorm's batch statistics let the loss see the future."""
    shape = (1, 5, 5)
    model = randomize(PixelCNN(image_size=shape[1:], hidden=8, blocks=1, norm="batch").double())
    order = raster_order(shape)
    model.train()
    leaks = input_jacobian_support(model, shape, batch_independent=False)
    assert leaks[0, 0, 0][order > 0].any(), "batch statistics should leak later pixels"
    model.eval()  # running statistics: a fixed affine map, causal again
    causal = input_jacobian_support(model, shape)
    assert not causal[0, 0, 0].any()


def test_pixelcnn_blind_spot_measured():
    """The stacked mask-B 3x3 kernels never reach up-and-right far enough: a blind spot remains.

    For the reference depth (15 blocks) on a 28x28 image, count the earlier pixels of the centre
    pixel that have no influence on it. (The structure does not depend on width: hidden=4.)
    """
    shape = (1, 28, 28)
    torch.manual_seed(0)
    model = randomize(PixelCNN(hidden=4, blocks=15).double(), std=0.5)
    i, j = 14, 14
    x = torch.rand(8, *shape, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x)[:, :, 0, i, j].sum(), x)
    seen = (grad != 0).any(0)[0]
    order = raster_order(shape)[0]
    earlier = order < order[i, j]
    blind = earlier & ~seen
    assert not seen[~earlier].any()
    # The blind spot lies above-right: the right edge of the visible cone in row i-d is j + 3 + (d-1)...
    rows, cols = torch.nonzero(blind, as_tuple=True)
    assert len(rows) > 0, "PixelCNN is known to have a blind spot"
    assert (rows < i).all() and (cols > j).all(), "every blind pixel lies above and to the right"
    print(f"blind spot of pixel ({i},{j}) at 15 blocks: {len(rows)} of {int(earlier.sum())} earlier pixels")
