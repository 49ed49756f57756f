"""jobs/score.py end to end: exact per-image likelihoods of image folders, Parquet and torchvision data, on
Ray Data actors, written exactly once; agreement with the library and with jobs/generate.py."""

import io
import math
import re

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from conftest import (MNIST_ROOT, kill_an_actor_midway, last_json_line, one_error_line, randomize, ray_info_lines, run_job,
                      run_main, s3_keys, start_job)
from jobs.schema import SCORE_SCHEMA
from pixelcnn.images import decode_png
from pixelcnn import PixelCNN, PixelCNNpp, evaluate, load_dataset, load_model, sample
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint
from pixelcnn.config import TrainConfig
from pixelcnn.likelihood import model_logits, nll_per_image
from pixelcnn.training import Runtime, train

pytestmark = pytest.mark.slow


def save_model(path, **config):
    torch.manual_seed(0)
    model = randomize(PixelCNN(hidden=8, blocks=1, **config), std=0.2)
    save_checkpoint(path / "model.pt", checkpoint_dict(model, step=1, dataset="test"))
    return model


def grey_folder(root, count, size=(6, 6), seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / f"{k:03d}.png")
    return root


def read(out):
    return pads.dataset(str(out), format="parquet").to_table().sort_by("id")


@pytest.fixture(scope="module")
def scored(ray_cluster, tmp_path_factory):
    """The module's independent scoring requests, started at once (each job mostly waits on Ray's start-up;
    half a CPU per actor leaves the cluster room for all): (their folder, the jobs by name)."""
    root = tmp_path_factory.mktemp("scored")
    half = ["--cpus-per-actor", 0.5]
    jobs = {}

    def start(name, *args):
        jobs[name] = start_job("score.py", *args, "--output", root / name / "out", *half, env=ray_cluster.env)

    save_model(root / "exact" / "model", image_size=(6, 6))
    start("exact", "--checkpoint", root / "exact" / "model", "--dataset", grey_folder(root / "exact" / "images", 60),
          "--dtype", "float64", "--batch-size", 7, "--num-actors", 2, "--rows-per-file", 25, "--per-pixel", "--report", 3)
    save_model(root / "builtin" / "model", image_size=(12, 12))
    start("builtin", "--checkpoint", root / "builtin" / "model", "--dataset", "synthetic", "--split", "test", "--dtype",
          "float64", "--batch-size", 128, "--rows-per-file", 256)
    save_model(root / "resize" / "model", image_size=(6, 6))  # 7x6 images for a 6x6 model
    start("resize", "--checkpoint", root / "resize" / "model", "--dataset", grey_folder(root / "resize" / "images", 10, size=(7, 6)),
          "--resize")
    # What a user would run: MNIST digits with inverted and noise images mixed in, scored by a model trained
    # briefly on MNIST (trained here while the jobs above start).
    cfg = TrainConfig(dataset="mnist", data_dir=str(MNIST_ROOT), subset=2048, test_subset=64, hidden=16, blocks=2,
                      batch_size=64, max_steps=60, lr=3e-3, warmup_steps=5, ema=0.0, grid_samples=0, log_every=100)
    train(cfg, Runtime(str(root / "outliers" / "model"), log=lambda *a, **k: None))
    digits = load_dataset("mnist", MNIST_ROOT, train=False, subset=40).images[:, 0].numpy()
    folder = root / "outliers" / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, digit in enumerate(digits):
        Image.fromarray(digit).save(folder / f"digit-{k:02d}.png")
    for k in range(5):
        Image.fromarray(255 - digits[k]).save(folder / f"inverted-{k}.png")
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"noise-{k}.png")
    start("outliers", "--checkpoint", root / "outliers" / "model", "--dataset", folder, "--report", 5)
    yield root, jobs
    for job in jobs.values():
        job.stop()


def test_scores_are_the_librarys_exact_log_prob_whatever_the_batch_and_actors(scored, ray_cluster):
    root, jobs = scored
    proc = jobs["exact"].result()
    model, images, out = load_model(root / "exact" / "model").double(), root / "exact" / "images", root / "exact" / "out"
    summary = last_json_line(proc.stdout)
    assert summary["images"] == summary["total_rows"] == 60 and summary["files"] == 3
    assert "bits/dim: mean" in proc.stdout
    assert summary["startup_seconds"] + summary["pipeline_seconds"] == pytest.approx(summary["seconds"], abs=0.002)
    assert re.search(r"scored 60 images in [\d.]+ s: [\d.]+ s start-up, [\d.]+ s pipeline \([\d.]+ images/s\)",
                     proc.stdout)
    table = read(out)
    assert table.schema.equals(SCORE_SCHEMA) and table.column("id").to_pylist() == list(range(60))
    data = load_dataset(str(images), test_fraction=0)
    expected = -nll_per_image(model_logits(model, data.images), data.images)
    scores = torch.tensor(table.column("log_prob").to_numpy())
    assert torch.allclose(scores, expected, rtol=1e-9, atol=0)
    rows = table.to_pylist()
    assert rows[5]["source"].endswith("images/005.png") and rows[5]["row"] is None and rows[5]["label"] is None
    assert rows[5]["dtype"] == "float64" and abs(rows[5]["bits_per_dim"] + rows[5]["log_prob"] / (36 * math.log(2))) < 1e-12
    heat = decode_png(rows[5]["nll_png"])
    assert heat.shape == (1, 6, 6) and heat.max() > 0
    report = Image.open(io.BytesIO((out / "_report.png").read_bytes()))
    assert report.size[0] > 100 and report.size[1] > 200
    again = run_main("score.py", "--checkpoint", root / "exact" / "model", "--dataset", images, "--output", out,
                     "--dtype", "float64", "--per-pixel", env=ray_cluster.env)
    assert last_json_line(again.stdout)["images"] == 0  # a rerun after success writes nothing


def test_the_mean_over_a_builtin_test_split_is_evaluates_bits_per_dim(scored):
    """A built-in dataset's test split (the synthetic one: 512 images of 12x12; MNIST's 10,000 of 28x28 take
    the same path at 80x the cost; its --data-dir: test_bad_input_is_one_line_and_writes_nothing) scored
    by the job averages to pixelcnn.evaluate's bits/dim, labels and all."""
    root, jobs = scored
    proc = jobs["builtin"].result()
    model = load_model(root / "builtin" / "model").double()
    test = load_dataset("synthetic", None, train=False)
    expected = evaluate(model, test, batch_size=128)["bits_per_dim"]
    assert last_json_line(proc.stdout)["bits_per_dim_mean"] == pytest.approx(expected, rel=1e-6)
    table = read(root / "builtin" / "out")
    assert len(table) == 512 and table.column("source").to_pylist()[0] == "synthetic:test"
    assert np.mean(table.column("bits_per_dim").to_numpy()) == pytest.approx(expected, rel=1e-9)
    assert table.column("label").to_pylist() == test.labels.tolist() and len(set(test.labels.tolist())) == 2


def test_images_of_another_size_are_scored_resized(scored):
    """Refused without --resize (test_bad_input_is_one_line_and_writes_nothing[size]), taken with it."""
    root, jobs = scored
    jobs["resize"].result()
    table = read(root / "resize" / "out")
    assert len(table) == 10 and table.column("id").to_pylist() == list(range(10))


def test_generated_samples_score_as_their_own_log_prob(ray_cluster, tmp_path):
    """The two jobs agree: generate.py's log_prob column (the sampler's, float32) is score.py's likelihood
    of the same images; scored in float64 they are the float64 model's exact ones. On PixelCNN++ (a
    discretized logistic mixture per subpixel): the PixelCNN's jobs are checked against the library in
    test_generate_job.py and above."""
    torch.manual_seed(0)
    model = randomize(PixelCNNpp(image_size=(5, 4), nr_filters=8, nr_resnet=1, nr_logistic_mix=3), std=0.1)
    save_checkpoint(tmp_path / "model" / "model.pt", checkpoint_dict(model, step=1, dataset="test"))
    proc = run_job("generate.py", "--checkpoint", tmp_path / "model", "--num-samples", 30, "--output", tmp_path / "samples",
                   "--rows-per-file", 30, env=ray_cluster.env)
    assert not ray_info_lines(proc.stdout + proc.stderr)
    debugs = {"float32": "1", "float64": "0"}  # Ray's INFO lines only with PIXELCNN_DEBUG=1
    jobs = {dtype: start_job("score.py", "--checkpoint", tmp_path / "model", "--dataset", tmp_path / "samples", "--output",
                             tmp_path / dtype, "--dtype", dtype, "--cpus-per-actor", 0.5,  # room for both at once
                             env={**ray_cluster.env, "PIXELCNN_DEBUG": debug}) for dtype, debug in debugs.items()}
    for dtype, job in jobs.items():
        proc = job.result()
        assert bool(ray_info_lines(proc.stderr)) == (debugs[dtype] == "1") and "UserWarning" not in proc.stderr
        generated, scored = read(tmp_path / "samples"), read(tmp_path / dtype)
        assert scored.column("row").to_pylist() == list(range(30))
        assert np.allclose(scored.column("log_prob").to_numpy(), generated.column("log_prob").to_numpy(), atol=1e-3)
    exact = sample(model.double(), 30, seed=0)
    images = np.stack([decode_png(png) for png in generated.column("image_png").to_pylist()])
    same = [k for k in range(30) if np.array_equal(images[k], exact.images[k].numpy())]
    assert len(same) >= 28  # float32 and float64 draws part only at CDF ties
    assert np.allclose(scored.column("log_prob").to_numpy()[same], exact.log_prob.numpy()[same], rtol=1e-9, atol=0)


def test_outliers_rank_at_the_unlikely_end(scored):
    """MNIST digits with inverted and noise images mixed in, scored by a model trained briefly on MNIST: the
    foreign images are the least likely."""
    root, jobs = scored
    jobs["outliers"].result()
    table = read(root / "outliers" / "out").sort_by([("bits_per_dim", "descending")])
    unlikely = [s.rsplit("/", 1)[1] for s in table.column("source").to_pylist()[:10]]
    assert all(name.startswith(("inverted", "noise")) for name in unlikely), unlikely


def test_a_killed_actor_and_a_lost_file_still_give_every_image_once(ray_cluster, s3, tmp_path):
    save_model(tmp_path / "model", image_size=(6, 6))
    s3.client.upload_file(str(tmp_path / "model" / "model.pt"), "pixelcnn", "models/score/model.pt")
    images = grey_folder(tmp_path / "images", 200)
    args = ["--checkpoint", "s3://pixelcnn/models/score", "--dataset", images, "--output", "s3://pixelcnn/scores/kill",
            "--rows-per-file", 10, "--batch-size", 5, "--num-actors", 2, "--address", ray_cluster.address]
    kill_an_actor_midway("score.py", args, env=ray_cluster.env, title="ScoreShards", temp_dir=ray_cluster.temp_dir,
                         started=lambda: any(k.endswith(".parquet") for k in s3_keys(s3.client, "pixelcnn", "scores/kill/")))
    keys = [k for k in s3_keys(s3.client, "pixelcnn", "scores/kill/") if k.endswith(".parquet")]
    assert len(keys) == 20
    s3.client.delete_object(Bucket="pixelcnn", Key=keys[7])
    proc = run_job("score.py", *args, env=ray_cluster.env)
    assert last_json_line(proc.stdout)["images"] == 10
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint.split("//")[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing")
    table = pads.dataset("pixelcnn/scores/kill", filesystem=fs, format="parquet").to_table(columns=["id"])
    assert sorted(table.column("id").to_pylist()) == list(range(200))


@pytest.mark.parametrize("case", ["size", "missing-checkpoint", "undecodable", "split-empty", "foreign", "mnist-elsewhere"])
def test_bad_input_is_one_line_and_writes_nothing(case, ray_cluster, tmp_path):
    save_model(tmp_path / "model", image_size=(6, 6))
    images = grey_folder(tmp_path / "images", 10, size=(7, 6) if case == "size" else (6, 6))
    out, checkpoint, extra = tmp_path / "out", tmp_path / "model", []
    if case == "missing-checkpoint":
        checkpoint = tmp_path / "nowhere"
    elif case == "undecodable":
        (images / "003.png").write_bytes(b"garbage")
    elif case == "split-empty":
        extra = ["--split", "test", "--test-fraction", 0.0001]
    elif case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "mnist-elsewhere":
        images, extra = "mnist", ["--data-dir", tmp_path / "no-mnist"]
    on_cluster = ["--address", ray_cluster.address]  # the session's cluster, from this process: no start-up per case
    proc = run_main("score.py", "--checkpoint", checkpoint, "--dataset", images, "--output", out, *extra, *on_cluster,
                    env=ray_cluster.env)
    expected = {"size": "the model takes images [1, 6, 6] (C, H, W), and 000.png is 7x6 L: pass --resize",
                "missing-checkpoint": "checkpoint not found", "undecodable": "003.png is not a decodable image",
                "split-empty": "the test split of", "foreign": "holds files that are not this job's (notes.txt)",
                "mnist-elsewhere": f"{tmp_path / 'no-mnist'}"}[case]
    assert expected in one_error_line(proc), proc.stderr[-2000:]
    if case == "foreign":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()
