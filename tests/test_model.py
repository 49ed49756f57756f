"""Model contract, clear errors for inputs it cannot take, and learning (overfitting a few images)."""

import pytest
import torch

from pixelcnn import PixelCNN
from pixelcnn.likelihood import loss_per_dim


def test_reference_defaults_and_output_contract():
    model = PixelCNN()
    cfg = model.config
    assert (cfg.in_channels, cfg.hidden, cfg.blocks, cfg.levels) == (1, 128, 15, 256)
    assert model.input_conv.kernel_size == (7, 7) and model.input_conv.mask_type == "A"
    assert model.input_conv.out_channels == 256 and len(model.blocks) == 15
    small = PixelCNN(in_channels=3, image_size=(5, 7), hidden=8, blocks=1)
    assert small(torch.rand(2, 3, 5, 7)).shape == (2, 256, 3, 5, 7)


@pytest.mark.parametrize("shape", [(2, 1, 28, 27), (2, 3, 28, 28), (1, 28, 28)])
def test_wrong_image_shape_is_one_clear_error(shape):
    model = PixelCNN(hidden=8, blocks=1)
    with pytest.raises(ValueError, match=r"expects images \[B, 1, 28, 28\]") as info:
        model(torch.rand(*shape))
    assert "\n" not in str(info.value)


def test_integer_input_and_labels_rejected():
    model = PixelCNN(hidden=8, blocks=1, image_size=(4, 4))
    with pytest.raises(ValueError, match="float"):
        model(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long))
    conditional = PixelCNN(hidden=8, blocks=1, image_size=(4, 4), num_classes=3)
    with pytest.raises(ValueError, match="labels are required"):
        conditional(torch.zeros(1, 1, 4, 4))
    for labels in ([3], [0, -1]):
        with pytest.raises(ValueError, match=r"0\.\.2"):
            conditional(torch.zeros(len(labels), 1, 4, 4), torch.tensor(labels))


def test_bad_config_values():
    with pytest.raises(ValueError, match="in_channels"):
        PixelCNN(in_channels=2)
    with pytest.raises(ValueError, match="norm"):
        PixelCNN(norm="layer")


@pytest.mark.slow
def test_small_model_overfits_a_handful_of_images(mnist_root):
    from pixelcnn import load_dataset

    torch.manual_seed(0)
    data = load_dataset("mnist", mnist_root, train=True, subset=8)
    model = PixelCNN(hidden=32, blocks=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = data.images.float() / 255
    losses = []
    for _ in range(150):
        loss = loss_per_dim(model(x), data.images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 4.0, losses[0]  # ~ln 256 = 5.5 nats/dim at init
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name", ["PixelCNN", "GatedPixelCNN"])
def test_every_parameter_gets_a_gradient(name):
    """DDP (find_unused_parameters=False, as Ray Train wraps it) fails on parameters with no gradient."""
    import pixelcnn

    model = getattr(pixelcnn, name)(image_size=(6, 6), hidden=8, num_classes=3)
    logits = model(torch.rand(2, 1, 6, 6), torch.tensor([0, 2]))
    loss_per_dim(logits, torch.randint(0, 256, (2, 1, 6, 6))).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused
