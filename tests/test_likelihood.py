"""Bits per dimension: exact sums, no dropped batch, uniform model = 8 bits/dim."""

import math

import pytest
import torch

from pixelcnn import PixelCNN, evaluate
from pixelcnn.data import ImageData, quantize
from pixelcnn.likelihood import bits_per_dim, nll_per_image


def test_uniform_logits_give_exactly_eight_bits_per_dim():
    levels = torch.randint(0, 256, (5, 3, 4, 4))
    logits = torch.zeros(5, 256, 3, 4, 4)
    nll = nll_per_image(logits, levels)
    assert torch.allclose(nll, torch.full((5,), 48 * math.log(256), dtype=torch.float64))
    assert abs(bits_per_dim(float(nll.sum()), 5, 48) - 8.0) < 1e-12



def test_evaluate_is_exact_and_independent_of_batch_size():
    torch.manual_seed(0)
    model = PixelCNN(image_size=(6, 6), hidden=8, blocks=1)
    data = ImageData(torch.randint(0, 256, (37, 1, 6, 6), dtype=torch.uint8), torch.zeros(37, dtype=torch.long), 1)
    results = [evaluate(model, data, batch_size=b)["bits_per_dim"] for b in (1, 8, 37, 100)]
    assert max(results) - min(results) < 1e-9
    # the figure equals the per-image sum computed directly, over all 37 images (none dropped)
    with torch.no_grad():
        direct = float(nll_per_image(model(data.images.float() / 255), data.images).sum())
    assert abs(results[0] - direct / (37 * 36 * math.log(2))) < 1e-9
    # a model with zeroed output layer is uniform: exactly 8 bits/dim
    with torch.no_grad():
        model.output_conv.weight.zero_()
        model.output_conv.bias.zero_()
    assert abs(evaluate(model, data, batch_size=10)["bits_per_dim"] - 8.0) < 1e-9


def test_a_model_with_fewer_levels_takes_quantized_data_and_refuses_pixels():
    torch.manual_seed(0)
    model = PixelCNN(image_size=(6, 6), hidden=8, blocks=1, levels=4)
    pixels = ImageData(torch.randint(0, 256, (9, 1, 6, 6), dtype=torch.uint8), torch.zeros(9, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"holds level \d+, but the model has 4 levels: quantize it first"):
        evaluate(model, pixels)
    result = evaluate(model, ImageData(quantize(pixels.images, 4), pixels.labels, 1))
    assert 0 < result["bits_per_dim"] < 4 and result["images"] == 9  # ~2 bits: near uniform over 4 levels
