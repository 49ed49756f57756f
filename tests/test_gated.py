"""Gated PixelCNN: causal with no blind spot (float64 gradients), cached sampling equal to the naive
sampler, exact log-probs, checkpoints, and class conditioning that a brief training run makes useful."""

import copy

import pytest
import torch

from conftest import randomize
from pixelcnn import GatedPixelCNN, PixelCNN, load_checkpoint, load_dataset, load_model, sample, save_checkpoint
from pixelcnn.checkpoint import checkpoint_dict
from pixelcnn.data import levels_to_input
from pixelcnn.likelihood import loss_per_dim, nll_per_image
from pixelcnn.sampling import make_stepper, sample_uniforms
from pixelcnn.sampling.graphs import GRAPHS, GraphCache, GraphedRun, precision_settings, run_graphed
from test_causality import input_jacobian_support, raster_order


def gated(channels=1, size=(7, 5), seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    kw = {"hidden": 12, "layers": 3, "kernel_size": 3, **kw}
    return randomize(GatedPixelCNN(in_channels=channels, image_size=size, **kw).to(dtype), seed=seed)


class WithLabels(torch.nn.Module):
    """``model(x)`` with fixed labels, for the Jacobian helper (which calls ``model(x)``)."""

    def __init__(self, model, labels):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, x):
        return self.model(x, self.labels[: len(x)])


def influence_union(model, shape, trials):
    """Influence of each input on each logit, united over ``trials`` random inputs (ReLUs that happen
    to be off for one input do not hide a path)."""
    return torch.stack([input_jacobian_support(model, shape, seed=s) for s in range(trials)]).any(0)


def assert_causal(influence, shape, *, no_blind_spot):
    order = raster_order(shape)
    channels, height, width = shape
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                own = order[c, i, j]
                seen = influence[c, i, j]
                assert not seen[order >= own].any(), f"logit ({c},{i},{j}) sees itself or the future"
                if no_blind_spot:
                    blind = torch.nonzero(~seen & (order < own)).tolist()
                    assert not blind, f"logit ({c},{i},{j}) is blind to earlier (c, i, j) {blind[:5]}"


CAUSAL_CASES = [  # channels, kernel size, layers, extra config; 7x7 images, layers enough to cover them
    (1, 3, 5, {}),
    (1, 5, 3, {"num_classes": 3}),
    (3, 5, 3, {}),
    (1, 3, 4, {"dilations": (1, 2)}),
]


@pytest.mark.parametrize("channels,kernel,layers,extra", CAUSAL_CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_causal_and_no_blind_spot(channels, kernel, layers, extra, mode):
    """Zero gradient from the own and every later position/channel; nonzero from EVERY earlier one."""
    shape = (channels, 7, 7)
    # Dropout in train mode: masks are per element, so they must not break causality either.
    model = gated(channels, shape[1:], kernel_size=kernel, layers=layers, dropout=0.1, **extra)
    model.train(mode == "train")
    if extra.get("num_classes"):
        model = WithLabels(model, torch.tensor([2, 1]))
    # In train mode dropout may cut a path in one forward pass: more trials make the union complete.
    assert_causal(influence_union(model, shape, trials=4 if mode == "train" else 2), shape, no_blind_spot=True)


def test_rgb_channel_ordering_within_a_pixel():
    shape = (3, 4, 4)
    influence = influence_union(gated(3, shape[1:], layers=2), shape, trials=2)
    for i, j in [(0, 0), (2, 1), (3, 3)]:
        # R sees no channel of its own pixel, G sees R, B sees R and G.
        assert influence[0, i, j, :, i, j].tolist() == [False, False, False]
        assert influence[1, i, j, :, i, j].tolist() == [True, False, False]
        assert influence[2, i, j, :, i, j].tolist() == [True, True, False]


def test_vertical_stack_never_sees_the_current_row():
    """The vertical stack's features at row i depend on rows < i only (so the link needs no shift)."""
    model = gated(3, (6, 5), layers=3)
    x = torch.rand(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    v = model.input_v(x * 2 - 1)
    for layer in model.layers:
        v, _, _ = layer(v, model.input_h(x * 2 - 1))
        for i in range(6):
            (grad,) = torch.autograd.grad(v[0, :, i].sum(), x, retain_graph=True)
            assert not grad[0, :, i:].any(), f"vertical features of row {i} see row >= {i}"


def test_fewer_layers_leave_only_the_receptive_field_short_not_a_blind_spot():
    """With too few layers the unseen pixels are the far ones (outside the cone), never a hole inside it."""
    shape = (1, 7, 7)
    influence = influence_union(gated(1, shape[1:], layers=2), shape, trials=2)  # reach 3 columns, 4 rows
    seen = influence[0, 6, 3, 0]
    assert seen[6, :3].all() and not seen[6, 3:].any()
    assert seen[3:6].all(), "every pixel of the 3 rows above is within reach"
    assert not seen[:2].any()


def teacher_forced_log_prob(model, images, labels=None):
    with torch.no_grad():
        logits = model(levels_to_input(images, 256, next(model.parameters()).dtype), labels)
    return -nll_per_image(logits, images)


SAMPLER_CASES = [  # model kind, channels, size, extra config, seed, temperature, batch sizes (naive, cached)
    ("gated", 1, (7, 5), {}, 0, 1.0, (3, 8)),
    ("gated", 1, (5, 7), {"kernel_size": 5, "dilations": (1, 2)}, 1, 0.7, (8, 3)),
    ("gated", 3, (5, 4), {}, 2, 1.0, (4, 5)),
    ("gated", 3, (3, 5), {"layers": 2}, 3, 1.3, (8, 8)),
    ("gated", 1, (7, 5), {"num_classes": 3}, 4, 1.0, (5, 2)),
    ("gated", 3, (4, 3), {"num_classes": 2}, 5, 0.9, (8, 4)),
    ("pixelcnn", 1, (7, 5), {"num_classes": 3}, 6, 1.0, (3, 8)),
    ("pixelcnn", 3, (4, 5), {"num_classes": 4}, 7, 1.2, (8, 5)),
    # Edge cases, cached at batch 1: a dilated RGB conditional model wider in reach than the image; one
    # layer (no residual), a dilated span wider than the image; a one-column RGB PixelCNN.
    ("gated", 3, (4, 3), {"num_classes": 2, "dilations": (1, 4)}, 8, 1.0, (8, 1)),
    ("gated", 1, (6, 2), {"layers": 1, "dilations": (3,)}, 9, 1.0, (4, 1)),
    ("pixelcnn", 3, (5, 1), {"num_classes": 2}, 10, 1.0, (3, 1)),
]


def sampler_model(kind, channels, size, extra, seed):
    if kind == "gated":
        return gated(channels, size, seed=seed, **extra)
    torch.manual_seed(seed)
    model = PixelCNN(in_channels=channels, image_size=size, hidden=12, blocks=2, **extra)
    return randomize(model.double(), seed=seed)


@pytest.mark.parametrize("kind,channels,size,extra,seed,temperature,batches", SAMPLER_CASES)
def test_cached_equals_naive_float64(kind, channels, size, extra, seed, temperature, batches):
    model = sampler_model(kind, channels, size, extra, seed)
    classes = extra.get("num_classes", 0)
    labels = torch.arange(8) % classes if classes else None
    naive = sample(model, 8, seed=seed, temperature=temperature, sampler="naive", batch_size=batches[0], labels=labels)
    cached = sample(model, 8, seed=seed, temperature=temperature, sampler="cached", batch_size=batches[1], labels=labels)
    assert torch.equal(naive.images, cached.images)
    assert torch.allclose(naive.log_prob, cached.log_prob, atol=1e-9, rtol=0)
    assert naive.images.float().std() > 10, "random weights should give varied images"
    # (c) the reported log-prob is the model's likelihood of the drawn image (temperature 1)
    assert torch.allclose(cached.log_prob, teacher_forced_log_prob(model, cached.images, labels), atol=1e-9, rtol=0)


def test_labels_change_conditional_samples():
    model = gated(1, (5, 5), num_classes=2)
    a = sample(model, 6, seed=0, labels=0)
    b = sample(model, 6, seed=0, labels=1)
    assert not torch.equal(a.images, b.images)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = gated(3, (6, 5), dtype=torch.float32, num_classes=3, dilations=(1, 2), dropout=0.2).eval()
    save_checkpoint(tmp_path / "model.pt", checkpoint_dict(model, step=3, dataset="synthetic"))
    loaded = load_model(tmp_path)
    x, labels = torch.rand(4, 3, 6, 5), torch.tensor([0, 2, 1, 1])
    assert type(loaded) is GatedPixelCNN and loaded.config == model.config and not loaded.training
    assert torch.equal(model(x, labels), loaded(x, labels))
    assert load_checkpoint(tmp_path)["model_class"] == "GatedPixelCNN"


def test_output_contract_and_bad_configs():
    model = GatedPixelCNN(in_channels=3, image_size=(5, 7), hidden=8, layers=1)
    assert model(torch.rand(2, 3, 5, 7)).shape == (2, 256, 3, 5, 7)
    cfg = GatedPixelCNN().config
    assert (cfg.hidden, cfg.layers, cfg.kernel_size, cfg.levels, cfg.num_classes) == (64, 12, 5, 256, 0)
    for bad, match in [
        ({"kernel_size": 4}, "kernel_size"), ({"kernel_size": 1}, "kernel_size"), ({"layers": 0}, "layers"),
        ({"dropout": 1.0}, "dropout"), ({"dilations": (1, 0)}, "dilations"), ({"in_channels": 2}, "in_channels"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            GatedPixelCNN(**bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"expects images \[B, 1, 28, 28\]"):
        GatedPixelCNN(hidden=8, layers=1)(torch.rand(1, 1, 28, 27))


@pytest.mark.slow
def test_class_conditioning_is_learned():
    """Briefly trained on synthetic bars (class 0 horizontal, 1 vertical), the model gives held-out
    images a clearly higher likelihood under their true label than under the other one."""
    train, test = load_dataset("synthetic", None), load_dataset("synthetic", None, train=False, subset=300)
    torch.manual_seed(0)
    model = GatedPixelCNN(image_size=(12, 12), hidden=8, layers=3, kernel_size=5, num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = torch.randint(0, len(train), (32,), generator=g)
        levels = train.images[batch]
        loss = loss_per_dim(model(levels_to_input(levels), train.labels[batch]), levels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        x = levels_to_input(test.images)
        true = nll_per_image(model(x, test.labels), test.images)
        flipped = nll_per_image(model(x, 1 - test.labels), test.images)
    gap = (flipped - true).mean().item()
    assert gap > 4.0, f"true labels should be worth > 4 nats per image, got {gap:.2f}"
    assert (flipped > true).float().mean() > 0.9


@pytest.mark.parametrize("case", [SAMPLER_CASES[1], SAMPLER_CASES[5], SAMPLER_CASES[7]])
def test_a_stepper_reused_for_later_batches_starts_clean(case):
    """What CUDA graph replay relies on: one stepper runs batch after batch, each as if it were fresh."""
    kind, channels, size, extra, seed, temperature, _ = case
    model = sampler_model(kind, channels, size, extra, seed).eval()
    classes = extra.get("num_classes", 0)
    stepper = make_stepper(model, 4, torch.float64, torch.device("cpu"))
    for ids in ([0, 1, 2, 3], [4, 5, 6, 7]):
        labels = torch.tensor(ids) % classes if classes else None
        u = sample_uniforms(seed, ids, channels * size[0] * size[1]).view(4, *size, channels)
        levels, log_prob = stepper.run(u, labels, temperature)
        fresh = sample(model, ids=ids, seed=seed, temperature=temperature, labels=labels, sampler="naive")
        assert torch.equal(levels.to(torch.uint8), fresh.images)
        assert torch.allclose(log_prob, fresh.log_prob, atol=1e-9, rtol=0)


def test_graph_cache_is_dropped_when_any_weight_changes():
    """Captured CUDA graphs read the weights as they were at capture. Whatever changes a parameter or
    buffer (an optimizer step, a write through ``.data`` that leaves the version counter alone, a cast)
    must invalidate them; nothing else may."""
    model = sampler_model("gated", 1, (5, 4), {"num_classes": 2}, 0)
    weights = lambda: [t.detach() for t in (*model.parameters(), *model.buffers())]  # noqa: E731
    cache = GraphCache(weights())
    assert cache.valid_for(weights())
    sample(model, 2, labels=1)  # sampling itself changes nothing
    assert cache.valid_for(weights())
    param = next(model.parameters())
    version = param._version
    param.data.mul_(1.5)
    assert param._version == version and not cache.valid_for(weights())
    cache = GraphCache(weights())
    with torch.no_grad():
        model.layers[0].label_bias.weight[1, 0] += 1
    assert not cache.valid_for(weights())
    cache = GraphCache(weights())
    model.float()
    assert not cache.valid_for(weights())


def test_graphs_are_keyed_on_precision_settings():
    """A graph replays the kernels chosen at its capture: one captured before TF32 was switched on (or
    off) must not stand in for an eager run under the new setting. The graph cache's first sight of a
    key runs eagerly (so this runs on the CPU): a changed setting must be a first sight again."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    model = sampler_model("pixelcnn", 1, (3, 2), {}, 0)
    u = sample_uniforms(0, torch.arange(2), 6).view(2, 3, 2, 1)
    before = precision_settings()
    matmul_before, conv_before = matmul.fp32_precision, conv.fp32_precision
    try:
        run_graphed(model, u, None, 1.0, "cached", lambda: make_stepper(model, 2, torch.float64, u.device))
        matmul.fp32_precision = "tf32"
        with_tf32_matmuls = precision_settings()
        run_graphed(model, u, None, 1.0, "cached", lambda: make_stepper(model, 2, torch.float64, u.device))
        conv.fp32_precision = "ieee"
        assert len({before, with_tf32_matmuls, precision_settings()}) == 3
        run_graphed(model, u, None, 1.0, "cached", lambda: make_stepper(model, 2, torch.float64, u.device))
        assert [key[-1] for key in GRAPHS[model].runs] == [before, with_tf32_matmuls, precision_settings()]
    finally:
        matmul.fp32_precision, conv.fp32_precision = matmul_before, conv_before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("case", [SAMPLER_CASES[2], SAMPLER_CASES[5], SAMPLER_CASES[7]])
def test_cuda_graph_replays_draw_the_cpu_images(case):
    """On a GPU, ``sample`` runs batch 1 eagerly, captures at batch 2 and replays from batch 3; a
    partial last batch runs eagerly, and a weight changed in place drops the graphs. Every image must
    match the CPU sampler (float64), and in float32 the graphs must match the eager GPU loop."""
    kind, channels, size, extra, seed, temperature, _ = case
    cpu_model = sampler_model(kind, channels, size, extra, seed)
    model = copy.deepcopy(cpu_model).cuda()
    classes = extra.get("num_classes", 0)
    labels = torch.arange(14) % classes if classes else None
    for update in range(2):
        if update:  # in place on the GPU, through .data: the version counter does not move
            next(model.parameters()).data.mul_(1.5)
            next(cpu_model.parameters()).data.mul_(1.5)
        cpu = sample(cpu_model, 14, seed=seed, temperature=temperature, labels=labels, batch_size=4)
        gpu = sample(model, 14, seed=seed, temperature=temperature, labels=labels, batch_size=4)
        assert any(isinstance(run, GraphedRun) for run in GRAPHS[model].runs.values())
        assert torch.equal(gpu.images, cpu.images)
        assert torch.allclose(gpu.log_prob, cpu.log_prob, atol=1e-9, rtol=0)
    model32 = copy.deepcopy(cpu_model).float().cuda()
    labels = labels[:12] if classes else None
    eager = sample(model32, 12, seed=seed, temperature=temperature, labels=labels, batch_size=4, cuda_graph=False)
    graphed = sample(model32, 12, seed=seed, temperature=temperature, labels=labels, batch_size=4)
    assert torch.equal(graphed.images, eager.images)
    assert torch.allclose(graphed.log_prob, eager.log_prob, atol=1e-6, rtol=0)
