"""PixelCNN++: the discretized logistic mixture is a proper distribution, the network is causal with no
blind spot (float64 gradients), the cached sampler draws the naive sampler's images, likelihoods and
checkpoints work through the distribution interface."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize
from pixelcnn import PixelCNNpp, evaluate, load_model, sample, save_checkpoint
from pixelcnn.checkpoint import checkpoint_dict
from pixelcnn.data import ImageData, levels_to_input
from pixelcnn.distributions import Categorical, DiscretizedLogisticMixture
from pixelcnn.likelihood import bits_per_dim, loss_per_dim, nll_per_image, score
from pixelcnn.sampling import make_stepper, sample_uniforms


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which on a busy machine
    costs 10x the wall time (measured). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(channels=1, size=(6, 6), seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = {"nr_filters": 8, "nr_resnet": 1, "nr_logistic_mix": 3, "dropout": 0.0, **kw}
    # std 0.1: weights far from init (label embeddings included) but activations of moderate size, so no
    # sigmoid or tanh saturates to an exact 0 gradient.
    return randomize(PixelCNNpp(in_channels=channels, image_size=size, **cfg).to(dtype), std=0.1, seed=seed)


def teacher_forced_log_prob(model, images, labels=None):
    with torch.no_grad():
        params = model(levels_to_input(images.long(), 256, torch.float64), labels)
    return -nll_per_image(params, images, model.config.distribution())


def random_params(mix, channels, batch, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    d = DiscretizedLogisticMixture(mix, channels)
    params = torch.randn(batch, d.num_params(), generator=g, dtype=torch.float64) * 2
    scales = slice(mix + channels * mix, mix + 2 * channels * mix)
    params[:, scales] = torch.rand(batch, channels * mix, generator=g, dtype=torch.float64) * 9 - 8  # log s in [-8, 1]
    if extreme:  # a scale that underflows exp(-log s), one at the clamp, means far outside [-1, 1]
        params[0, scales] = 800.0
        params[1, scales] = -50.0
        params[2, mix:mix + channels * mix] = 40.0
    return d, params


# --- the mixture ------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("extreme", [False, True])
def test_mixture_probabilities_over_all_levels_sum_to_one(channels, extreme):
    """Each channel's conditional p(v | channels before it) sums to 1 over v = 0..255 (float64), for any
    earlier levels; so the joint does too. Edge levels included: their bins reach to -inf and +inf."""
    d, params = random_params(4, channels, 6, seed=channels, extreme=extreme)
    before = torch.randint(0, 256, (6, channels), generator=torch.Generator().manual_seed(1))
    before[:2] = torch.tensor([0, 255])[:, None]  # edge levels as the conditioning values
    for c in range(channels):
        log_p = d.channel_logits(params, before, c)
        assert torch.isfinite(log_p).all()
        assert (log_p.exp().sum(1) - 1).abs().max() < (1e-12 if not extreme else 1e-10)
        assert torch.logsumexp(log_p, 1).abs().max() < (1e-12 if not extreme else 1e-10)
    if channels == 1:  # the same through log_prob: every level of one image-wide pixel
        levels = torch.arange(256)[:, None, None, None]
        log_p = d.log_prob(params[:, None, :, None, None].expand(-1, 256, -1, -1, -1).flatten(0, 1), levels.repeat(6, 1, 1, 1))
        assert (log_p.view(6, 256).exp().sum(1) - 1).abs().max() < (1e-12 if not extreme else 1e-10)


def test_mixture_log_prob_is_the_chain_of_channel_conditionals_and_has_finite_gradients():
    d, params = random_params(3, 3, 8, seed=2, extreme=True)
    levels = torch.randint(0, 256, (8, 3), generator=torch.Generator().manual_seed(3))
    levels[0], levels[1] = 0, 255
    params.requires_grad_(True)
    log_p = d.log_prob(params[:, :, None, None], levels[:, :, None, None])[:, :, 0, 0]
    chain = torch.stack([d.channel_logits(params, levels, c).gather(1, levels[:, c:c + 1])[:, 0] for c in range(3)], 1)
    assert torch.allclose(log_p, chain, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(log_p.sum(), params)
    assert torch.isfinite(grad).all()


def test_mixture_matches_the_reference_formula_and_its_edge_cases():
    """openai/pixel-cnn's discretized_mix_logistic_loss (its plain branch, moderate scales), written over
    this module's parameter order: the same parameters, the same linear dependence of G on R and of B on R and G, the CDF tails at 0 and 255."""
    mix, b = 5, 64
    d, params = random_params(mix, 3, b, seed=4)
    # Moderate values (means in [-1, 1], log s in [-2, 0]), where the reference's difference of two CDFs is
    # accurate (far in a tail it cancels to 0; the formula under test does not).
    g = torch.Generator().manual_seed(5)
    params[:, mix:4 * mix] = torch.rand(b, 3 * mix, generator=g, dtype=torch.float64) * 2 - 1
    params[:, 4 * mix:7 * mix] = torch.rand(b, 3 * mix, generator=g, dtype=torch.float64) * 2 - 2
    levels = torch.randint(0, 256, (b, 3), generator=g)
    levels[:8, 0], levels[8:16, 1], levels[16:24, 2] = 0, 255, 255
    x = levels.double() / 127.5 - 1  # [B, 3]
    logit_probs = params[:, :mix]
    means, log_scales = params[:, mix:4 * mix].view(b, 3, mix), params[:, 4 * mix:7 * mix].view(b, 3, mix)
    coeffs = torch.tanh(params[:, 7 * mix:].view(b, 3, mix))
    m = torch.stack([means[:, 0], means[:, 1] + coeffs[:, 0] * x[:, 0:1],
                     means[:, 2] + coeffs[:, 1] * x[:, 0:1] + coeffs[:, 2] * x[:, 1:2]], 1)
    centred, inv_s = x[:, :, None] - m, torch.exp(-log_scales.clamp(min=-7))
    cdf_plus, cdf_min = torch.sigmoid(inv_s * (centred + 1 / 255)), torch.sigmoid(inv_s * (centred - 1 / 255))
    per_channel = torch.where(x[:, :, None] < -0.999, torch.log(cdf_plus),
                              torch.where(x[:, :, None] > 0.999, torch.log1p(-cdf_min), torch.log(cdf_plus - cdf_min)))
    reference = torch.logsumexp(per_channel.sum(1) + torch.log_softmax(logit_probs, 1), 1)
    ours = d.log_prob(params[:, :, None, None], levels[:, :, None, None]).sum(1)[:, 0, 0]
    assert torch.allclose(ours, reference, atol=1e-9, rtol=0)


def test_softmax_distribution_is_the_cross_entropy():
    logits = torch.randn(2, 256, 3, 4, 5, dtype=torch.float64)
    levels = torch.randint(0, 256, (2, 3, 4, 5))
    assert torch.equal(Categorical(256).log_prob(logits, levels), -F.cross_entropy(logits, levels, reduction="none"))
    with pytest.raises(ValueError, match="distribution"):  # mixture parameters read as softmax logits
        nll_per_image(torch.zeros(2, 30, 4, 5), levels)


# --- the network --------------------------------------------------------------------------------------


def influence(model, shape, seed=0):
    """``seen[c, i, j]``, bool ``[H, W]``: which input pixels affect log p at (channel c, i, j), from one
    backward pass: query q = (c, i, j) is asked of its own copy q of one random image (the batch's images
    are independent, asserted first)."""
    channels, height, width = shape
    distribution = model.config.distribution()
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, *shape, generator=g, dtype=torch.float64)
    levels = torch.randint(0, 256, (1, *shape), generator=g)
    x = image.repeat(2, 1, 1, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(distribution.log_prob(model(x), levels.expand(2, -1, -1, -1))[0].sum(), x)
    assert torch.all(grad[1] == 0), "images in a batch must not influence each other"
    queries = channels * height * width
    x = image.expand(queries, -1, -1, -1).clone().requires_grad_(True)
    log_p = distribution.log_prob(model(x), levels.expand(queries, -1, -1, -1))
    q = torch.arange(queries)
    c, i, j = q // (height * width), q // width % height, q % width
    (grad,) = torch.autograd.grad(log_p[q, c, i, j].sum(), x)
    return (grad != 0).any(1).view(channels, height, width, height, width)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_log_prob_depends_only_on_earlier_pixels_and_every_one_of_them(channels, mode):
    """log p(x_c | ...) at (i, j) has zero gradient w.r.t. the input at (i, j) (every channel: the mixture,
    not the network, orders R -> G -> B) and every later pixel, and nonzero gradient w.r.t. every earlier
    pixel: no blind spot (8x8, two blocks per resolution: the receptive field covers the image)."""
    shape = (channels, 8, 8)
    model = tiny(channels, shape[1:], nr_resnet=2).train(mode == "train")
    seen = influence(model, shape)
    order = torch.arange(64).view(8, 8)
    for c in range(channels):
        for i in range(8):
            for j in range(8):
                assert not seen[c, i, j][order >= order[i, j]].any(), f"({c},{i},{j}) sees itself or the future"
                assert seen[c, i, j][order < order[i, j]].all(), f"({c},{i},{j}) misses an earlier pixel"


def test_dropout_in_training_keeps_causality():
    shape = (3, 6, 5)
    model = tiny(3, shape[1:], dropout=0.5).train()
    seen = influence(model, shape)
    order = torch.arange(30).view(6, 5)
    for i in range(6):
        for j in range(5):
            assert not seen[:, i, j][:, order >= order[i, j]].any()


def test_fewer_blocks_leave_only_the_receptive_field_short_not_a_hole():
    """With one block per resolution the far pixels at the edges of odd rows fall outside the field: the
    pixel 7 columns left in the same row, or 7 right in the row above. Nothing else is unseen."""
    seen = influence(tiny(1, (8, 8), nr_resnet=1), (1, 8, 8))[0]
    order = torch.arange(64).view(8, 8)
    for i in range(8):
        for j in range(8):
            unseen = {tuple(p) for p in torch.nonzero(~seen[i, j] & (order < order[i, j])).tolist()}
            assert unseen <= {(i, j - 7), (i - 1, j + 7)}, (i, j, unseen)


@pytest.mark.parametrize("nr_resnet", [0, 1])
def test_every_parameter_gets_a_gradient(nr_resnet):
    """DDP (find_unused_parameters=False, as Ray Train wraps it) fails on parameters with no gradient."""
    model = PixelCNNpp(in_channels=3, image_size=(6, 5), nr_filters=4, nr_resnet=nr_resnet, nr_logistic_mix=2,
                       num_classes=3)
    params = model(torch.rand(2, 3, 6, 5), torch.tensor([0, 2]))
    assert params.shape == (2, 20, 6, 5)
    loss_per_dim(params, torch.randint(0, 256, (2, 3, 6, 5)), model.config.distribution()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


def test_bad_config_values():
    for bad in ({"nr_filters": 0}, {"nr_resnet": -1}, {"nr_logistic_mix": 0}, {"dropout": 1.0}, {"in_channels": 2}):
        with pytest.raises(ValueError):
            PixelCNNpp(**bad)
    with pytest.raises(ValueError, match="expects images"):
        PixelCNNpp(image_size=(6, 6), nr_filters=4, nr_resnet=0)(torch.rand(1, 1, 5, 6))


# --- sampling -------------------------------------------------------------------------------------------


CASES = [  # channels, size, extra config, seed, temperature, batch sizes (naive, cached)
    (1, (6, 6), {}, 0, 1.0, (3, 4)),
    (3, (5, 4), {"num_classes": 2}, 1, 1.0, (4, 3)),
    (1, (7, 5), {"nr_resnet": 0}, 2, 0.8, (4, 1)),  # odd sizes: 7x5 -> 4x3 -> 2x2
    (3, (3, 6), {"nr_logistic_mix": 1}, 3, 1.3, (2, 4)),
]


@pytest.mark.parametrize("case", CASES)
def test_cached_sampler_draws_the_naive_samplers_images(case):
    """float64: identical images, whatever the batch size, log-probs equal to the teacher-forced likelihood."""
    channels, size, extra, seed, temperature, (naive_batch, cached_batch) = case
    model = tiny(channels, size, seed, **extra)
    classes = extra.get("num_classes", 0)
    labels = torch.arange(4) % classes if classes else None
    naive = sample(model, 4, seed=seed, temperature=temperature, sampler="naive", batch_size=naive_batch, labels=labels)
    cached = sample(model, 4, seed=seed, temperature=temperature, sampler="cached", batch_size=cached_batch, labels=labels)
    assert torch.equal(naive.images, cached.images)
    assert torch.allclose(naive.log_prob, cached.log_prob, atol=1e-9, rtol=0)
    assert torch.allclose(cached.log_prob, teacher_forced_log_prob(model, cached.images, labels), atol=1e-9, rtol=0)
    assert len(cached.images.unique()) > 10  # the draws spread over the levels: the comparison means something


def test_same_image_for_the_same_seed_and_id_and_labels_matter():
    model = tiny(3, (4, 4), seed=5, num_classes=3)
    whole = sample(model, 6, seed=7, labels=1, batch_size=4)
    part = sample(model, ids=[5, 2], seed=7, labels=1, batch_size=1)
    assert torch.equal(whole.images[[5, 2]], part.images)
    assert torch.allclose(whole.log_prob[[5, 2]], part.log_prob, atol=1e-12, rtol=0)
    other = sample(model, 6, seed=7, labels=2, batch_size=4)
    assert all(not torch.equal(a, b) for a, b in zip(whole.images, other.images)), "the class must change each image"
    assert torch.allclose(other.log_prob, teacher_forced_log_prob(model, other.images, torch.full((6,), 2)), atol=1e-9, rtol=0)


def test_a_stepper_reused_for_later_batches_starts_clean():
    """What CUDA graph replay relies on: one stepper runs batch after batch, each as if it were fresh."""
    model = tiny(3, (5, 3), seed=6, num_classes=2).eval()
    stepper = make_stepper(model, 2, torch.float64, torch.device("cpu"))
    for ids in ([0, 1], [2, 3]):
        labels = torch.tensor(ids) % 2
        u = sample_uniforms(6, ids, 3 * 5 * 3).view(2, 5, 3, 3)
        levels, log_prob = stepper.run(u, labels, 1.0)
        fresh = sample(model, ids=ids, seed=6, labels=labels, batch_size=1)
        assert torch.equal(levels.to(torch.uint8), fresh.images)
        assert torch.allclose(log_prob, fresh.log_prob, atol=1e-12, rtol=0)


def test_fused_sampler_refuses_pixelcnnpp_in_one_line():
    with pytest.raises(ValueError) as info:
        sample(tiny(1, (3, 3)), 1, sampler="fused")
    assert str(info.value) == "sampler='fused' samples PixelCNN only, not PixelCNNpp; use sampler='cached'"


# --- likelihood and checkpoints ---------------------------------------------------------------------------


def test_evaluate_and_score_are_exact_through_the_mixture():
    model = tiny(3, (4, 5), seed=8, nr_resnet=0, num_classes=2).eval()
    images = torch.randint(0, 256, (7, 3, 4, 5), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    with torch.no_grad():
        log_p = model.config.distribution().log_prob(model(levels_to_input(images.long(), 256, torch.float64), labels),
                                                     images.long())
    expected = -log_p.flatten(1).sum(1)
    result = evaluate(model, ImageData(images, labels, 2), batch_size=3)
    assert result["bits_per_dim"] == pytest.approx(bits_per_dim(float(expected.sum()), 7, 60), abs=1e-12)
    assert result["bits_per_dim"] == pytest.approx(float(expected.sum()) / (7 * 60 * math.log(2)), abs=1e-12)
    scored = score(model, images, labels, per_pixel=True)
    assert torch.allclose(scored["log_prob"], -expected, atol=1e-9, rtol=0)
    assert scored["nll_map"].shape == (7, 4, 5)
    marginal = score(model, images)  # no labels: log sum_c p(c) p(x | c)
    assert (marginal["log_prob"] <= -expected + math.log(2) + 1e-9).all()


def test_checkpoint_round_trip(tmp_path):
    model = tiny(3, (6, 5), seed=9, dtype=torch.float32, nr_logistic_mix=4, num_classes=2, dropout=0.3).eval()
    save_checkpoint(tmp_path / "model.pt", checkpoint_dict(model, step=3))
    loaded = load_model(tmp_path)
    assert type(loaded) is PixelCNNpp and loaded.config == model.config and not loaded.training
    assert loaded.config.nr_logistic_mix == 4
    x, labels = torch.rand(2, 3, 6, 5), torch.tensor([1, 0])
    assert torch.equal(model(x, labels), loaded(x, labels))
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["model_class"] == "PixelCNNpp" and ckpt["model_config"]["nr_logistic_mix"] == 4


# --- training ---------------------------------------------------------------------------------------------


def test_training_builds_it_from_the_registry_and_reports_exact_bits_per_dim(tmp_path):
    """--model pixelcnnpp: the models package's registry, --hidden as nr_filters, a few steps of the real loop
    (loss through the mixture), a checkpoint that loads back, and a test figure equal to ``evaluate``'s."""
    from pixelcnn import load_dataset
    from pixelcnn.models import MODELS
    from pixelcnn.config import TrainConfig
    from pixelcnn.training import Runtime, train

    assert MODELS["pixelcnnpp"] is PixelCNNpp
    cfg = TrainConfig(dataset="synthetic", subset=16, test_subset=8, batch_size=8, max_steps=2, model="pixelcnnpp",
                      hidden=4, nr_resnet=0, nr_logistic_mix=2, dropout=0.1, conditional=True, grid_samples=2,
                      log_every=100)
    config = cfg.model_config()
    assert (config.nr_filters, config.nr_resnet, config.nr_logistic_mix, config.dropout) == (4, 0, 2, 0.1)
    final = train(cfg, Runtime(str(tmp_path / "run"), log=lambda *a, **k: None))
    model = load_model(tmp_path / "run")
    assert type(model) is PixelCNNpp and model.config.num_classes == 2
    test = load_dataset("synthetic", None, train=False, subset=8)
    assert final["test_bits_per_dim"] == pytest.approx(evaluate(model, test)["bits_per_dim"], abs=1e-6)
    assert 0 < final["test_bits_per_dim"] < 16
    with pytest.raises(ValueError, match="--dropout"):
        TrainConfig(dataset="synthetic", model="pixelcnn", dropout=0.1)
