"""Sampling: per-sample random streams, exact log-probs, and the cached sampler equal to the naive one."""

import copy
import math

import numpy as np
import pytest
import torch

from conftest import randomize
from pixelcnn import PixelCNN, sample
from pixelcnn.data import levels_to_input
from pixelcnn.likelihood import nll_per_image
from pixelcnn.sampling import draw, labels_for_ids, sample_uniforms


def tiny(channels=1, size=(5, 4), dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    model = PixelCNN(in_channels=channels, image_size=size, hidden=kw.pop("hidden", 12), blocks=kw.pop("blocks", 2), **kw)
    return randomize(model.to(dtype), seed=seed)


def teacher_forced_log_prob(model, images, labels=None):
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        logits = model(levels_to_input(images, 256, dtype), labels)
    return -nll_per_image(logits, images)


def test_uniform_streams_depend_only_on_seed_and_id():
    a = sample_uniforms(5, [0, 1, 2, 3], 10)
    b = sample_uniforms(5, [2, 3], 10)
    assert torch.equal(a[2:], b)
    assert not torch.equal(sample_uniforms(6, [2, 3], 10), b)
    assert (a >= 0).all() and (a < 1).all() and a.dtype == torch.float64
    big = sample_uniforms(0, np.arange(200), 500)
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.std().item() - math.sqrt(1 / 12)) < 0.01


def test_labels_drawn_per_id_follow_the_class_probabilities():
    weights = [1, 0, 6, 3]  # normalised by the function: 0.1, 0, 0.6, 0.3
    labels = labels_for_ids(3, np.arange(40_000), weights)
    frequency = torch.bincount(labels, minlength=4).double() / len(labels)
    assert torch.allclose(frequency, torch.tensor([0.1, 0, 0.6, 0.3], dtype=torch.float64), atol=0.01)  # ~4 sigma
    assert frequency[1] == 0
    assert torch.equal(labels_for_ids(3, [7, 5], weights), labels[[7, 5]])  # label k depends on (seed, k) alone
    assert not torch.equal(labels_for_ids(4, np.arange(100), weights), labels[:100])


def test_draw_is_inverse_cdf():
    logits = torch.log(torch.tensor([[0.25, 0.5, 0.25]]))
    for u, expected in [(0.0, 0), (0.2499, 0), (0.2501, 1), (0.7499, 1), (0.7501, 2), (0.999999, 2)]:
        level, lp = draw(logits, torch.tensor([u], dtype=torch.float64), 1.0)
        assert level.item() == expected
        assert abs(lp.item() - math.log([0.25, 0.5, 0.25][expected])) < 1e-6
    # The smallest level whose cumulative probability exceeds u: never one of probability 0, even at u = 0.
    level, lp = draw(torch.tensor([[-math.inf, 0.0, 0.0]]), torch.zeros(1, dtype=torch.float64), 1.0)
    assert level.item() == 1 and lp.item() == pytest.approx(math.log(0.5))


def test_sampling_leaves_the_model_in_its_mode():
    """sample() evaluates in eval mode and puts the model back: a training loop that draws a sample grid
    goes on training in train mode (dropout on, BatchNorm updating)."""
    model = tiny(norm="batch")
    for sampler in ("naive", "cached"):
        for training in (True, False):
            model.train(training)
            sample(model, 2, sampler=sampler)
            assert model.training == training and all(m.training == training for m in model.modules())


@pytest.mark.parametrize("sampler", ["naive", "cached"])
def test_seeds_and_batch_sizes(sampler):
    model = tiny()
    a = sample(model, 6, seed=1, sampler=sampler, batch_size=6)
    b = sample(model, 6, seed=1, sampler=sampler, batch_size=6)
    c = sample(model, 6, seed=2, sampler=sampler, batch_size=6)
    d = sample(model, 6, seed=1, sampler=sampler, batch_size=4)
    e = sample(model, ids=[4, 5], seed=1, sampler=sampler)
    assert a.images.dtype == torch.uint8 and a.images.shape == (6, 1, 5, 4)
    assert torch.equal(a.images, b.images) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.images, c.images)
    assert torch.equal(a.images, d.images)
    assert torch.equal(a.images[4:], e.images)
    assert a.images.float().std() > 10, "random weights should give varied images"


@pytest.mark.parametrize("sampler", ["naive", "cached"])
@pytest.mark.parametrize("channels", [1, 3])
def test_log_prob_equals_teacher_forced_forward(sampler, channels):
    model = tiny(channels)
    s = sample(model, 5, seed=3, sampler=sampler, temperature=0.8)
    assert torch.allclose(s.log_prob, teacher_forced_log_prob(model, s.images), atol=1e-9, rtol=0)


CASES = [  # channels, image size, seed, temperature, batch sizes (naive, cached)
    (1, (7, 5), 0, 1.0, (3, 8)),
    (1, (4, 6), 1, 0.7, (8, 2)),
    (3, (5, 4), 2, 1.0, (4, 3)),
    (3, (3, 5), 3, 1.3, (8, 8)),
]


@pytest.mark.parametrize("channels,size,seed,temperature,batches", CASES)
def test_cached_equals_naive_float64(channels, size, seed, temperature, batches):
    model = tiny(channels, size, seed=seed, norm="batch" if seed == 1 else "none")
    if seed == 1:  # eval-mode BatchNorm with non-trivial running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    naive = sample(model, 8, seed=seed, temperature=temperature, sampler="naive", batch_size=batches[0])
    cached = sample(model, 8, seed=seed, temperature=temperature, sampler="cached", batch_size=batches[1])
    assert torch.equal(naive.images, cached.images)
    assert torch.allclose(naive.log_prob, cached.log_prob, atol=1e-9, rtol=0)


def explained_by_float_tie(model, a, b, u_seed, sample_id, label=None, atol=1e-4):
    """Where two float32 samplers disagree, the first differing draw must sit on a CDF boundary (``label``:
    the sample's class, for a conditional model)."""
    channels, height, width = a.shape
    u = sample_uniforms(u_seed, [sample_id], channels * height * width).view(height, width, channels)
    diff = [(i, j, c) for i in range(height) for j in range(width) for c in range(channels) if a[c, i, j] != b[c, i, j]]
    i, j, c = diff[0]
    with torch.no_grad():
        labels = None if label is None else torch.as_tensor(label).view(1)
        logits = model(levels_to_input(a[None].long(), 256).float(), labels)[0, :, c, i, j].double()
    cdf = torch.softmax(logits, 0).cumsum(0)
    return (cdf - u[i, j, c]).abs().min() < atol


@pytest.mark.parametrize("channels", [1, 3])
def test_cached_equals_naive_float32(channels):
    model = tiny(channels, (6, 5), dtype=torch.float32, seed=4)
    naive = sample(model, 16, seed=9, sampler="naive", batch_size=16)
    cached = sample(model, 16, seed=9, sampler="cached", batch_size=5)
    for k in range(16):
        if not torch.equal(naive.images[k], cached.images[k]):
            assert explained_by_float_tie(model, naive.images[k], cached.images[k], 9, k)
    same = [k for k in range(16) if torch.equal(naive.images[k], cached.images[k])]
    assert len(same) >= 15
    assert torch.allclose(naive.log_prob[same], cached.log_prob[same], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_cached_equals_naive_after_training(mnist_root):
    """A briefly trained (peaked, MNIST-like) model, 28x28, float64."""
    from pixelcnn import load_dataset
    from pixelcnn.likelihood import loss_per_dim

    torch.manual_seed(0)
    data = load_dataset("mnist", mnist_root, subset=64)
    model = PixelCNN(hidden=8, blocks=2).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        loss = loss_per_dim(model(data.images.double() / 255), data.images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    naive = sample(model, 3, seed=5, sampler="naive", batch_size=3)
    cached = sample(model, 3, seed=5, sampler="cached", batch_size=2)
    assert torch.equal(naive.images, cached.images)
    assert torch.allclose(naive.log_prob, cached.log_prob, atol=1e-9, rtol=0)
    assert torch.allclose(cached.log_prob, teacher_forced_log_prob(model, cached.images), atol=1e-9, rtol=0)


def test_bfloat16_model_draws_images_the_float32_model_scores_alike():
    """A bf16 copy of a model samples faster on GPUs. Its images may differ from float32 draws (a draw
    near a CDF boundary can flip), but the log-prob it reports must stay close to the float32 model's
    own likelihood of each image: here within 0.02 nats per dimension (measured: < 0.007), where a model
    with other weights is off by ~2."""
    model = tiny(1, (6, 5), dtype=torch.float32, seed=1)
    fast = copy.deepcopy(model).to(torch.bfloat16)
    drawn = sample(fast, 16, seed=3)
    error_per_dim = (drawn.log_prob - teacher_forced_log_prob(model, drawn.images)).abs() / 30
    assert error_per_dim.max() < 0.02
    assert drawn.images.float().std() > 10


def test_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="temperature"):
        sample(model, 2, temperature=0)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, 2, sampler="fast")
    with pytest.raises(ValueError, match="exactly one"):
        sample(model)
    with pytest.raises(ValueError, match="unconditional"):
        sample(model, 2, labels=1)
    with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
        sample(model, 2, seed=2**63)
