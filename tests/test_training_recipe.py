"""The training recipe, in process on the synthetic dataset: EMA weights saved as the model with both
test figures reported, exact resume (raw + EMA weights, AdamW state, schedule, dropout masks), the
learning-rate schedules, and the jobs/train.py flags that set them."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, randomize
from pixelcnn import CheckpointError, GatedPixelCNN, evaluate, load_dataset, load_model
from pixelcnn.checkpoint import load_checkpoint
from pixelcnn.config import TrainConfig
from pixelcnn.likelihood import loss_per_dim, model_logits, nll_per_image
from pixelcnn.options import identity_fields
from pixelcnn.sampling.streams import derive_seed
from pixelcnn.training import EMA, Runtime, learning_rate, train

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# 256 images at batch 64: 4 steps per epoch, 3 epochs; a gated model small enough for ~0.1 s a step.
TINY = dict(
    dataset="synthetic", subset=256, test_subset=64, batch_size=64, epochs=3, model="gated", hidden=8, layers=2,
    kernel_size=3, grid_samples=0, log_every=100,
)


def run(tmp_path, name, **overrides):
    cfg = TrainConfig(**{**TINY, **overrides})
    lines = []
    final = train(cfg, Runtime(str(tmp_path / name), log=lambda message, **_: lines.append(message)))
    return final, load_checkpoint(tmp_path / name), lines


def test_ema_weights_are_the_model_and_both_figures_are_reported(tmp_path):
    final, ckpt, _ = run(tmp_path, "ema", ema=0.9)
    raw, averaged = ckpt["training"]["raw_state"], ckpt["model_state"]
    assert raw.keys() == averaged.keys()
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw), "EMA weights should differ from the raw ones"
    assert final["test_bits_per_dim"] != final["test_bits_per_dim_raw"]
    # test_bits_per_dim is the saved model's (what load_model and sampling use), _raw the raw weights'.
    test = load_dataset("synthetic", None, train=False, subset=TINY["test_subset"])
    model = load_model(tmp_path / "ema")
    assert abs(evaluate(model, test)["bits_per_dim"] - final["test_bits_per_dim"]) < 1e-5
    model.load_state_dict(raw)
    assert abs(evaluate(model, test)["bits_per_dim"] - final["test_bits_per_dim_raw"]) < 1e-5
    metrics = [json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert all({"test_bits_per_dim", "test_bits_per_dim_raw"} <= m.keys() for m in metrics)


def test_without_ema_the_raw_weights_are_the_model(tmp_path):
    final, ckpt, _ = run(tmp_path, "raw", ema=0.0, max_steps=2)
    assert "raw_state" not in ckpt["training"]
    assert final["test_bits_per_dim"] == final["test_bits_per_dim_raw"]


def test_ema_model_carries_the_raw_models_batchnorm_statistics(tmp_path):
    """Buffers are copied, not averaged: the saved (EMA) model normalises with the statistics training
    gathered, not with its initial zeros and ones."""
    _, ckpt, _ = run(tmp_path, "ema-bn", ema=0.9, model="pixelcnn", hidden=8, blocks=1, norm="batch", max_steps=2)
    raw, averaged = ckpt["training"]["raw_state"], ckpt["model_state"]
    buffers = [k for k in raw if "running_" in k or "num_batches_tracked" in k]
    assert buffers and all(torch.equal(raw[k], averaged[k]) for k in buffers)
    assert any(float(raw[k].abs().sum()) > 0 for k in buffers if "running_mean" in k)


def test_reported_train_loss_is_the_mean_cross_entropy_in_bits(tmp_path):
    """train_bits_per_dim after one step: that step's loss (the initial model on the first batch) / ln 2."""
    final, _, _ = run(tmp_path, "loss", ema=0.0, max_steps=1)
    config = TrainConfig(**TINY)
    data = load_dataset("synthetic", None, train=True, subset=TINY["subset"])
    batch = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed(config.seed, 1, 0)))[:config.batch_size]
    torch.manual_seed(config.seed)
    model = GatedPixelCNN(config.model_config())
    with torch.no_grad():
        loss = loss_per_dim(model_logits(model, data.images[batch], data.labels[batch]), data.images[batch])
    assert final["train_bits_per_dim"] == pytest.approx(float(loss) / math.log(2), rel=1e-5)


def test_ema_update_follows_its_formula():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.99)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)  # ramp: min(0.99, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.model.weight, d * before + (1 - d) * model.weight, atol=1e-6, rtol=0)
    assert not ema.model.weight.requires_grad
    before = ema.model.weight.clone()
    ema.update(model, step=10_000)  # ramp over: the decay itself
    assert torch.allclose(ema.model.weight, 0.99 * before + 0.01 * model.weight, atol=1e-6, rtol=0)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """Stopped at step 5 (inside epoch 2) and resumed to 10 == 10 steps in one go: raw and EMA weights,
    AdamW state, cosine schedule with warm-up, weight decay and dropout masks all carry over."""
    recipe = dict(dropout=0.1, ema=0.9, schedule="cosine", warmup_steps=3, weight_decay=0.01, lr=3e-3)
    _, stopped, _ = run(tmp_path, "resumed", max_steps=5, **recipe)
    assert stopped["step"] == 5
    final, resumed, lines = run(tmp_path, "resumed", max_steps=10, **recipe)
    assert "resuming from step 5 with 1 worker" in lines
    once_final, once, _ = run(tmp_path, "once", max_steps=10, **recipe)
    assert resumed["step"] == once["step"] == 10
    for name in ("model_state",):
        for key, value in once[name].items():
            assert torch.equal(resumed[name][key], value), f"{name}[{key}]"
    for key, value in once["training"]["raw_state"].items():
        assert torch.equal(resumed["training"]["raw_state"][key], value), f"raw_state[{key}]"
    resumed_opt, once_opt = resumed["training"]["optimizer"], once["training"]["optimizer"]
    for index, state in once_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_opt["state"][index][key], value), f"optimizer state {index} {key}"
    assert final["test_bits_per_dim"] == once_final["test_bits_per_dim"]
    assert final["lr"] == once_final["lr"]
    # ... and the run did move: the comparison is not between two untouched initialisations.
    torch.manual_seed(0)
    init = GatedPixelCNN(TrainConfig(**TINY).model_config()).state_dict()
    assert any(not torch.allclose(init[k], once["training"]["raw_state"][k]) for k in init)


def test_max_time_fixes_the_steps_once_and_the_schedule_spans_them(tmp_path):
    """--max-time buys a number of steps measured before the first one; it is kept in the checkpoint's
    config, so the resumed run trains those (not a new measurement), its schedule spanning them: the same
    weights as a run given that number outright."""
    recipe = dict(max_time=1.5, warmup_steps=2, epochs=1, ema=0.0)
    _, stopped, lines = run(tmp_path, "budget", max_steps=3, **recipe)
    steps = stopped["training"]["config"]["schedule_steps"]
    assert stopped["step"] == 3 and steps > 8 and f"--max-time 1.5 s buys {steps} steps" in lines[0]
    final, resumed, lines = run(tmp_path, "budget", **recipe)
    assert "resuming from step 3 with 1 worker" in lines and not any("buys" in line for line in lines)
    assert final["step"] == steps and final["done"] and final["epoch"] > 1  # past --epochs 1: the budget decides
    # The last step's rate: the cosine (after 2 warm-up steps) spans the budget's steps, not --epochs 1's 4.
    assert final["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (steps - 3) / (steps - 2))))
    assert final["lr"] < 2e-5
    _, once, _ = run(tmp_path, "once", schedule_steps=steps, **recipe)
    for key, value in once["model_state"].items():
        assert torch.equal(resumed["model_state"][key], value), key
    with pytest.raises(ValueError, match="--max-time must be > 0"):
        TrainConfig(**{**TINY, "max_time": 0})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_resumed_run_folder_lists_each_report_once(tmp_path):
    """metrics.jsonl and curve.jsonl follow the checkpoint: a report (or point) whose model never landed (a
    crash between the two) is gone after the resume, not listed twice, and the points after the resume are
    an uninterrupted run's. A corrupt checkpoint is one CheckpointError line."""
    run(tmp_path, "run", max_steps=5, log_every=3)
    metrics, curve = tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "curve.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"step": 8}) + "\n")
    curve.write_text(curve.read_text() + json.dumps({"step": 6}) + "\n")
    _, ckpt, _ = run(tmp_path, "run", max_steps=10, log_every=3)
    steps = [m["step"] for m in read_jsonl(metrics)]
    assert steps == [m["step"] for m in ckpt["training"]["history"]] == [4, 5, 8, 10]
    points = read_jsonl(curve)
    # every 3 steps, and each report (4 and 8 end epochs, 5 and 10 end a start of the run)
    assert [p["step"] for p in points] == [p["step"] for p in ckpt["training"]["curve"]] == [3, 4, 5, 6, 8, 9, 10]
    assert all(a["elapsed_s"] <= b["elapsed_s"] and a["train_s"] < b["train_s"] for a, b in zip(points, points[1:]))  # summed over both starts
    assert all(0 < p["train_s"] <= p["elapsed_s"] for p in points)  # steps only: evaluations and reports are not in it
    _, once, _ = run(tmp_path, "once", max_steps=10, log_every=3)  # no stop at 5: its point 6 spans steps 5-6
    uninterrupted = {p["step"]: p for p in once["training"]["curve"]}
    assert sorted(uninterrupted) == [3, 4, 6, 8, 9, 10]
    for p in points[-3:]:  # the windows 7-8, 9 and 10: the same figures
        assert p["train_bits_per_dim"] == uninterrupted[p["step"]]["train_bits_per_dim"], p["step"]
    assert ckpt["epoch"] == 2 and ckpt["step"] == 10  # whole epochs done, as the metrics count them
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["curve.jsonl", "metrics.jsonl", "metrics.png",
                                                                    "model.pt"]  # no temporaries
    (tmp_path / "run" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is corrupt or not a PixelCNN checkpoint") as info:
        run(tmp_path, "run", max_steps=12)
    assert "\n" not in str(info.value)


def test_the_curve_has_a_point_per_log_window_and_the_test_figure_at_each_evaluation(tmp_path):
    """curve.jsonl: a point every --log-every steps (the window's train bits/dim, lr, images/s, elapsed
    seconds), the test figures at each --eval-every step and each report; metrics.jsonl: the reports,
    whose train figure is the last window's, not the mean since the previous report."""
    final, ckpt, _ = run(tmp_path, "curve", max_steps=10, log_every=3, eval_every=5, ema=0.9)
    points = read_jsonl(tmp_path / "curve" / "curve.jsonl")
    assert [p["step"] for p in points] == [3, 4, 5, 6, 8, 9, 10]
    assert all({"step", "epoch", "world_size", "lr", "train_bits_per_dim", "images_per_s", "elapsed_s", "train_s"} <= p.keys()
               for p in points)
    tested = [p["step"] for p in points if "test_bits_per_dim" in p]
    assert tested == [4, 5, 8, 10]  # reports at 4, 8 and 10 (epoch ends, the last step), --eval-every 5 at 5
    assert all("test_bits_per_dim_raw" in p for p in points if "test_bits_per_dim" in p)
    config = TrainConfig(**{**TINY, "max_steps": 10, "log_every": 3, "eval_every": 5})
    assert all(p["lr"] == pytest.approx(learning_rate(config, p["step"] - 1, 4)) for p in points)
    reports = read_jsonl(tmp_path / "curve" / "metrics.jsonl")
    assert [m["step"] for m in reports] == [4, 8, 10] and reports[-1]["done"] and final == reports[-1]
    by_step = {p["step"]: p for p in points}
    for m in reports:  # a report is the curve's point at its step
        assert {k: v for k, v in m.items() if k != "done"} == by_step[m["step"]]
    # The final train figure is its window's (step 10 alone): per step, a --log-every 1 run's.
    _, steps, _ = run(tmp_path, "per-step", max_steps=10, log_every=1, ema=0.9)
    per_step = {p["step"]: p["train_bits_per_dim"] for p in steps["training"]["curve"]}
    assert final["train_bits_per_dim"] == pytest.approx(per_step[10], rel=1e-12)
    assert reports[0]["train_bits_per_dim"] == pytest.approx(per_step[4], rel=1e-12)  # window 4 (3 was a point)
    assert by_step[3]["train_bits_per_dim"] == pytest.approx(sum(per_step[s] for s in (1, 2, 3)) / 3, rel=1e-12)
    assert final["train_bits_per_dim"] != pytest.approx(sum(per_step[s] for s in (9, 10)) / 2, rel=1e-9)


def test_sample_grids_and_metrics_count_whole_epochs_alike(tmp_path):
    """samples_epoch_NNN.png is written once NNN epochs are done, as metrics' epoch says; a run that stops
    mid-epoch names its last grid by its step."""
    run(tmp_path, "grids", max_steps=6, grid_samples=4)  # 4 steps an epoch: an epoch end at 4, a stop at 6
    reports = read_jsonl(tmp_path / "grids" / "metrics.jsonl")
    assert [(m["step"], m["epoch"]) for m in reports] == [(4, 1), (6, 1)]
    grids = sorted(p.name for p in (tmp_path / "grids").glob("samples_*.png"))
    assert grids == ["samples_epoch_001.png", "samples_step_000006.png"]


def test_cosine_schedule_values():
    cfg = TrainConfig(lr=1e-3, epochs=2, schedule="cosine", warmup_steps=10)
    steps_per_epoch = 55  # 110 steps in all: 10 warm-up, then 100 of cosine
    lr = [learning_rate(cfg, s, steps_per_epoch) for s in range(110)]
    assert lr[0] == pytest.approx(1e-4) and lr[4] == pytest.approx(5e-4)  # linear warm-up
    assert lr[9] == pytest.approx(1e-3) and lr[10] == pytest.approx(1e-3)  # peak
    assert lr[60] == pytest.approx(0.5e-3)  # half way through the cosine
    assert lr[35] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert 0 < lr[109] < 1e-6  # ~0 at the last step
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    # max_steps stops early without changing the schedule: a stopped run resumes onto the same curve.
    assert learning_rate(TrainConfig(**{**cfg.to_dict(), "max_steps": 20}), 60, steps_per_epoch) == lr[60]


def test_the_warm_up_never_outlasts_a_short_run():
    """A 40-step run reaches --lr (the warm-up capped at a quarter of the schedule) and anneals to ~0; a run
    at least four times its warm-up keeps the schedule it always had; --max-steps changes neither."""
    short = TrainConfig(lr=1e-3, epochs=1, warmup_steps=100)
    lr = [learning_rate(short, s, 40) for s in range(40)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3) == max(lr)  # 10 warm-up steps
    assert 0 < lr[39] < 1e-5
    assert [learning_rate(TrainConfig(**{**short.to_dict(), "max_steps": 5}), s, 40) for s in range(40)] == lr
    constant = TrainConfig(lr=1e-3, epochs=1, warmup_steps=100, schedule="constant")
    assert learning_rate(constant, 9, 40) == pytest.approx(1e-3) and learning_rate(constant, 39, 40) == pytest.approx(1e-3)
    long = TrainConfig(lr=1e-3, epochs=1, warmup_steps=100)  # 400 steps: the warm-up fits, as asked
    assert learning_rate(long, 49, 400) == pytest.approx(5e-4) and learning_rate(long, 99, 400) == pytest.approx(1e-3)
    assert learning_rate(long, 100 + 150, 400) == pytest.approx(0.5e-3)  # half way through the cosine's 300 steps
    assert learning_rate(TrainConfig(lr=1e-3, epochs=1, warmup_steps=3), 0, 2) == 1e-3  # too short to warm up


def test_constant_schedule_keeps_lr_decay_per_epoch():
    cfg = TrainConfig(lr=1e-3, schedule="constant", lr_decay=0.5, warmup_steps=4, epochs=3)
    assert [learning_rate(cfg, s, 10) for s in (0, 3, 9, 10, 25)] == pytest.approx([2.5e-4, 1e-3, 1e-3, 5e-4, 2.5e-4])


def test_the_optimizer_steps_with_the_scheduled_lr(tmp_path):
    cfg = dict(schedule="cosine", warmup_steps=2, lr=2e-3, checkpoint_every=2, ema=0.0)
    run(tmp_path, "lr", **cfg)
    metrics = [json.loads(line) for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    config = TrainConfig(**{**TINY, **cfg})
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    for m in metrics:  # "lr" is the rate of the last step taken
        assert m["lr"] == pytest.approx(learning_rate(config, m["step"] - 1, 4))
    # The rate a step is taken with, read off the weights: Adam's first step moves every weight whose
    # gradient is not ~0 by the rate itself (m / sqrt(v) = g / |g|), here warm-up's half of the peak.
    _, one_step, _ = run(tmp_path, "one-step", **cfg, max_steps=1)
    torch.manual_seed(0)
    init = GatedPixelCNN(config.model_config()).state_dict()
    moved = max(float((one_step["model_state"][k] - v).abs().max()) for k, v in init.items())
    assert moved == pytest.approx(learning_rate(config, 0, 4), rel=1e-3) and learning_rate(config, 0, 4) == 1e-3


@pytest.mark.parametrize("bad,match", [
    ({"schedule": "linear"}, "--schedule"), ({"ema": 1.0}, "--ema"), ({"dropout": 0.1}, "--model gated"),
    ({"kernel_size": 4}, "--kernel-size"), ({"lr_decay": 0.9}, "--schedule constant"),
    ({"warmup_steps": -1}, "--warmup-steps"), ({"layers": 0}, "--layers"), ({"grad_clip": -1.0}, "--grad-clip"),
    ({"schedule": "constant", "lr_decay": 0.0}, "--lr-decay must be > 0"), ({"blocks": -1}, "--blocks"),
    ({"norm": "layer"}, "--norm"), ({"lr": math.nan}, "--lr must be a finite number"),
    ({"weight_decay": math.inf}, "--weight-decay must be a finite number"), ({"seed": 2**63}, "--seed must be a 64-bit integer"),
    ({"eval_every": -1}, "--eval-every must be >= 0"),
])
def test_bad_recipe_values_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        TrainConfig(**bad)
    assert "\n" not in str(info.value)


def test_job_flags_map_onto_the_config(capsys):
    from jobs import train as job

    cfg, run = job.parse_args([
        "--model", "gated", "--hidden", "32", "--layers", "7", "--kernel-size", "3", "--dropout", "0.2",
        "--ema", "0.995", "--schedule", "constant", "--warmup-steps", "50", "--lr-decay", "0.9",
        "--weight-decay", "0.01", "--dataset", "synthetic",
    ])
    assert (cfg.model, cfg.hidden, cfg.layers, cfg.kernel_size, cfg.dropout) == ("gated", 32, 7, 3, 0.2)
    assert (cfg.ema, cfg.schedule, cfg.warmup_steps, cfg.lr_decay, cfg.weight_decay) == (0.995, "constant", 50, 0.9, 0.01)
    assert run.name == "synthetic-gated-h32-l7-k3"
    _, pp = job.parse_args(["--model", "pixelcnnpp", "--hidden", "16", "--nr-resnet", "2", "--nr-logistic-mix", "5"])
    assert pp.name == "mnist-pixelcnnpp-h16-r2-m5"  # its own shape, not --blocks (which it has not)
    assert isinstance(GatedPixelCNN(cfg.model_config()), GatedPixelCNN)
    assert {"layers", "kernel_size", "dataset", "batch_size", "seed"} <= set(identity_fields(TrainConfig))
    assert not {"epochs", "lr", "max_steps"} & set(identity_fields(TrainConfig))
    defaults, job_defaults = job.parse_args([])
    assert defaults == TrainConfig(data_dir=defaults.data_dir)  # flag defaults are TrainConfig's
    assert job_defaults == job.TrainJob(name=job_defaults.name)  # ... and the job's own, TrainJob's
    with pytest.raises(SystemExit):
        job.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--layers", "--kernel-size", "--dropout", "--ema", "--schedule", "--warmup-steps", "--weight-decay"):
        assert f"{flag} " in text, flag


def test_rerun_identity_check_fills_flags_a_stored_run_predates(tmp_path):
    from jobs import train as job
    from jobs.errors import JobError
    from jobs.storage import open_storage

    run_dir = open_storage(str(tmp_path)).child("old")
    stored = {"dataset": "mnist", "subset": None, "model": "pixelcnn", "hidden": 128, "blocks": 15, "norm": "none",
              "conditional": False, "batch_size": 128, "seed": 0}  # written before --layers existed
    run_dir.write("config.json", json.dumps(stored).encode())
    def check(cfg):  # as the job calls it
        return job.check_run_config(run_dir, cfg, reported=job.last_metrics(run_dir) is not None)

    # A run that stopped before its first report (no metrics.jsonl) has trained nothing: it binds nothing.
    assert check(TrainConfig(hidden=64)) is None
    run_dir.write("metrics.jsonl", b'{"step": 10}\n')
    check(TrainConfig())  # no complaint about --layers / --kernel-size
    with pytest.raises(JobError, match="--layers 12 -> 6"):
        check(TrainConfig(layers=6))
    with pytest.raises(JobError, match="--hidden 128 -> 64"):
        check(TrainConfig(hidden=64))


@pytest.mark.parametrize("previous,asked,trained", [
    ({"step": 8, "epoch": 1}, {"epochs": 1}, True),  # the same length again
    ({"step": 16, "epoch": 2}, {"epochs": 1}, True),  # less than done
    ({"step": 8, "epoch": 1}, {"epochs": 2}, False),  # more epochs: train on
    ({"step": 6, "epoch": 0}, {"epochs": 1}, False),  # stopped mid-epoch (a crash, or --max-steps before)
    ({"step": 2, "epoch": 0}, {"epochs": 3, "max_steps": 2}, True),
    ({"step": 2, "epoch": 0}, {"epochs": 3, "max_steps": 3}, False),
    ({"step": 40, "epoch": 5}, {"epochs": 1, "max_time": 60, "schedule_steps": 50}, False),  # the budget's steps
    ({"step": 50, "epoch": 6}, {"epochs": 9, "max_time": 60, "schedule_steps": 50}, True),  # not --epochs
])
def test_a_rerun_trains_only_if_it_asks_for_more(previous, asked, trained):
    from jobs.train import already_trained

    assert already_trained(previous, TrainConfig(**{**TINY, "subset": None, **asked})) == trained


def test_in_memory_batches_give_each_image_once_per_epoch_in_shares_of_one_global_batch():
    from pixelcnn.data import ImageData
    from pixelcnn.batches import InMemoryBatches

    data = ImageData(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.zeros(10, dtype=torch.long), 0)
    one = InMemoryBatches(data, 4, seed=5, rank=0, world_size=1, device="cpu")
    assert one.steps_per_epoch == 3  # 4 + 4 + the short last batch of 2
    for epoch in range(3):
        global_batches = [b.levels.flatten().tolist() for b in one.epoch(epoch)]
        assert sorted(sum(global_batches, [])) == list(range(10))  # every image once
        ranks = [list(InMemoryBatches(data, 4, 5, r, 3, "cpu").epoch(epoch)) for r in range(3)]
        for step, batch in enumerate(global_batches):
            shares = [ranks[r][step] for r in range(3)]
            assert sum((s.levels.flatten().tolist() for s in shares), []) == batch  # the global batch, in rank order
            assert max(len(s.levels) for s in shares) - min(len(s.levels) for s in shares) <= 1
            assert {s.total for s in shares} == {len(batch)}
    resumed = [b.levels.flatten().tolist() for b in one.epoch(1, start=2)]
    assert resumed == [b.levels.flatten().tolist() for b in one.epoch(1)][2:]  # a resume sees the same batches


def test_weighted_shares_give_the_one_worker_gradient():
    """Averaged over workers as DDP does, the share losses' gradients are the mean loss's over the whole
    global batch, for uneven shares and a share of no images alike (float64)."""
    from pixelcnn.training import share_loss

    torch.manual_seed(0)
    model = randomize(GatedPixelCNN(image_size=(4, 4), hidden=6, layers=2, kernel_size=3)).double()
    levels = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)

    def gradient(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = gradient(nll_per_image(model_logits(model, levels), levels).sum() / levels.numel())  # the mean, in float64
    for world in (2, 3, 6):
        shares = [levels[r * 5 // world:(r + 1) * 5 // world] for r in range(world)]
        grads = [gradient(share_loss(model, s if len(s) else levels[:1], None, 5, world, weight=float(len(s) > 0))[1])
                 for s in shares]
        assert torch.allclose(sum(grads) / world, whole, rtol=1e-10, atol=1e-14), world


def test_the_progress_line_has_an_eta_and_the_run_folder_its_pictures(tmp_path):
    from PIL import Image

    _, _, lines = run(tmp_path, "pictures", max_steps=4, log_every=2, grid_samples=4, epochs=1)
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == 2 and all("ETA" in line and "images/s" in line for line in progress)
    assert any(line.startswith("report at step 4: train") for line in lines)
    chart = Image.open(tmp_path / "pictures" / "metrics.png")
    assert chart.size == (640, 400) and len(np.unique(np.asarray(chart.convert("RGB")).reshape(-1, 3), axis=0)) > 3  # drawn, not blank
    grid = Image.open(tmp_path / "pictures" / "samples_epoch_001.png")
    assert grid.size == (4 * (2 * (12 + 2) + 2),) * 2  # 2x2 images of 12x12 with 2-pixel gaps, 4x enlarged
