"""jobs/generate.py end to end: Ray Data actors on a real local Ray cluster, Parquet on loopback S3."""

import re
import signal
import subprocess

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import (kill_an_actor_midway, stop_job, one_error_line, PYTHON, REPO, last_json_line, randomize, run_job, run_main,
                      s3_keys, start_job)
from jobs.schema import SAMPLE_SCHEMA
from pixelcnn.images import decode_png
from pixelcnn import PixelCNN, load_model, sample
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint
from pixelcnn.sampling import labels_for_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, s3):
    """A small unconditional and a conditional model, saved locally and uploaded to S3."""
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, classes in (("plain", 0), ("cond", 10)):
        torch.manual_seed(0)
        model = randomize(PixelCNN(hidden=8, blocks=1, image_size=(12, 10), num_classes=classes), std=0.2)
        path = folder / name / "model.pt"
        save_checkpoint(path, checkpoint_dict(model, step=1, dataset="test"))
        s3.client.upload_file(str(path), "pixelcnn", f"models/{name}/model.pt")
        paths[name] = path
    return paths


def s3_fs(s3):
    return pafs.S3FileSystem(endpoint_override=s3.endpoint.split("//")[1], scheme="http", region="us-east-1",
                             access_key="testing", secret_key="testing")


def read_rows(s3, prefix):
    fs = s3_fs(s3)
    files = sorted(f"pixelcnn/{k}" for k in s3_keys(s3.client, "pixelcnn", prefix) if k.endswith(".parquet"))
    return pads.dataset(files, filesystem=fs, format="parquet").to_table().sort_by("id"), files


def etags(s3, prefix):
    return {k: s3.client.head_object(Bucket="pixelcnn", Key=k)["ETag"] for k in s3_keys(s3.client, "pixelcnn", prefix)}


def test_samples_to_s3_with_two_actors(ray_cluster, s3, checkpoints):
    proc = run_job(
        "generate.py", "--checkpoint", "s3://pixelcnn/models/plain", "--num-samples", 240, "--output",
        "s3://pixelcnn/samples/a", "--seed", 7, "--rows-per-file", 40, "--num-actors", 2, "--batch-size", 16,
        "--preview", 9, "--address", ray_cluster.address, env=ray_cluster.env,
    )
    summary = last_json_line(proc.stdout)
    assert summary["samples"] == 240 and summary["total_rows"] == 240 and summary["output"] == "s3://pixelcnn/samples/a"
    assert summary["files"] == 6 and "generated 240 samples" in proc.stdout
    # start-up and the pipeline apart: the actors' time stamp travels through Ray Data to the summary
    assert 0 < summary["startup_seconds"] and 0 < summary["pipeline_seconds"]
    assert summary["startup_seconds"] + summary["pipeline_seconds"] == pytest.approx(summary["seconds"], abs=0.002)
    assert summary["pipeline_samples_per_s"] > summary["samples_per_s"]
    assert re.search(r"generated 240 samples in [\d.]+ s: [\d.]+ s start-up, [\d.]+ s pipeline \([\d.]+ samples/s\)",
                     proc.stdout)
    table, files = read_rows(s3, "samples/a/")
    assert len(files) == 6 and files[0].endswith("part-000000000000-000000000039.parquet")
    assert pq.read_schema(files[0], filesystem=s3_fs(s3)).equals(SAMPLE_SCHEMA)
    assert table.column("id").to_pylist() == list(range(240))
    rows = table.to_pylist()
    model = load_model(checkpoints["plain"])
    expected = sample(model, 240, seed=7)
    sha = __import__("hashlib").sha256(checkpoints["plain"].read_bytes()).hexdigest()
    for k, row in enumerate(rows):
        image = decode_png(row["image_png"])
        assert image.shape == (1, 12, 10) and (row["height"], row["width"], row["channels"]) == (12, 10, 1)
        assert np.array_equal(image, expected.images[k].numpy()), f"id {k} differs from pixelcnn.sample"
        assert abs(row["log_prob"] - expected.log_prob[k].item()) < 1e-3
        assert abs(row["bits_per_dim"] + row["log_prob"] / (120 * np.log(2))) < 1e-9
        assert row["seed"] == 7 and row["label"] is None and row["temperature"] == 1.0 and row["sampler"] == "cached"
        assert row["dtype"] == "float32"
        assert row["checkpoint"] == "s3://pixelcnn/models/plain/model.pt" and row["model_sha256"] == sha
        assert row["created_at"].tzinfo is not None
    preview = s3.client.get_object(Bucket="pixelcnn", Key="samples/a/_preview.png")["Body"].read()
    assert Image.open(__import__("io").BytesIO(preview)).size[0] > 3 * 10
    # The whole folder reads as one dataset: Parquet readers skip the _manifest.json and _preview.png.
    assert pads.dataset("pixelcnn/samples/a", filesystem=s3_fs(s3), format="parquet").count_rows() == 240

    # Rerun after success: nothing new is written, not even rewritten (the preview neither).
    before = etags(s3, "samples/a/")
    again = run_main("generate.py", "--checkpoint", "s3://pixelcnn/models/plain", "--num-samples", 240, "--output",
                     "s3://pixelcnn/samples/a", "--seed", 7, "--rows-per-file", 40, "--preview", 9, env=ray_cluster.env)
    assert last_json_line(again.stdout)["samples"] == 0
    assert etags(s3, "samples/a/") == before

    # Lose two files (an interrupted job) and rerun: only those ids are written, each exactly once.
    lost = [k for k in before if k.endswith(".parquet")][1:3]
    for key in lost:
        s3.client.delete_object(Bucket="pixelcnn", Key=key)
    resumed = run_job("generate.py", "--checkpoint", "s3://pixelcnn/models/plain", "--num-samples", 240, "--output",
                      "s3://pixelcnn/samples/a", "--seed", 7, "--rows-per-file", 40, "--num-actors", 2,
                      "--address", ray_cluster.address, env=ray_cluster.env)
    assert last_json_line(resumed.stdout)["samples"] == 80
    after = etags(s3, "samples/a/")
    assert all(after[k] == v for k, v in before.items() if k not in lost), "untouched files were rewritten"
    table2, _ = read_rows(s3, "samples/a/")
    assert table2.column("id").to_pylist() == list(range(240))
    assert table2.column("image_png").to_pylist() == table.column("image_png").to_pylist()


@pytest.fixture(scope="module")
def small_jobs(checkpoints, ray_cluster, tmp_path_factory):
    """Three small requests into local folders, started at once (each job mostly waits on Ray's start-up; half a
    CPU per actor leaves the cluster room for all three): (their folder, the jobs by name)."""
    out = tmp_path_factory.mktemp("small")
    jobs = {
        # other batch size, actors and file size than test_samples_to_s3_with_two_actors
        "batch": ("--checkpoint", checkpoints["plain"], "--num-samples", 50, "--seed", 7, "--rows-per-file", 25,
                  "--num-actors", 1, "--batch-size", 7),
        "bf16": ("--checkpoint", checkpoints["plain"], "--num-samples", 30, "--seed", 3, "--dtype", "bfloat16",
                 "--rows-per-file", 30),
        "cond": ("--checkpoint", checkpoints["cond"], "--num-samples", 30, "--label-probs", "0,0,1,0,0,0,0,0,3,0",
                 "--rows-per-file", 30),
    }
    started = {name: start_job("generate.py", *args, "--output", out / name, "--cpus-per-actor", 0.5, env=ray_cluster.env)
               for name, args in jobs.items()}
    yield out, started
    for job in started.values():
        job.stop()


def test_batch_size_and_actor_count_do_not_change_images(checkpoints, small_jobs):
    """Local output, other batch size / actors / file size: same images as pixelcnn.sample."""
    folder, jobs = small_jobs
    jobs["batch"].result()
    out = folder / "batch"
    table = pads.dataset(str(out), format="parquet").to_table().sort_by("id")
    assert sorted(p.name for p in out.iterdir()) == [
        "_manifest.json", "part-000000000000-000000000024.parquet", "part-000000000025-000000000049.parquet"]
    expected = sample(load_model(checkpoints["plain"]), 50, seed=7, batch_size=50)
    images = np.stack([decode_png(png) for png in table.column("image_png").to_pylist()])
    assert np.array_equal(images, expected.images.numpy())


def test_bfloat16_samples_and_a_rerun_of_another_dtype_or_seed_is_refused(checkpoints, small_jobs, ray_cluster):
    """--dtype bfloat16 samples with a bfloat16 copy of the model; an output holds one request only: another
    dtype or seed is refused, the output untouched."""
    folder, jobs = small_jobs
    jobs["bf16"].result()
    out = folder / "bf16"
    table = pads.dataset(str(out), format="parquet").to_table().sort_by("id")
    assert set(table.column("dtype").to_pylist()) == {"bfloat16"}
    images = np.stack([decode_png(png) for png in table.column("image_png").to_pylist()])
    model = load_model(checkpoints["plain"])
    float32 = sample(model, 30, seed=3)
    bfloat16 = sample(model.to(torch.bfloat16), 30, seed=3)
    assert np.array_equal(images, bfloat16.images.numpy())
    assert not np.array_equal(images, float32.images.numpy()), "the job sampled in float32"
    assert np.allclose(table.column("log_prob").to_numpy(), bfloat16.log_prob.numpy(), atol=1e-3)

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for other, change in ((["--seed", 3], "dtype 'bfloat16' -> 'float32'"),
                          (["--seed", 4, "--dtype", "bfloat16"], "seed 3 -> 4")):
        proc = run_main("generate.py", "--checkpoint", checkpoints["plain"], "--num-samples", 60, "--output", out,
                        *other, env=ray_cluster.env)
        assert f"holds rows of another request ({change})" in one_error_line(proc)
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_conditional_labels(checkpoints, small_jobs):
    folder, jobs = small_jobs
    jobs["cond"].result()
    table = pads.dataset(str(folder / "cond"), format="parquet").to_table().sort_by("id")
    labels = table.column("label").to_pylist()
    assert set(labels) <= {2, 8} and labels == labels_for_ids(0, np.arange(30), [0, 0, .25, 0, 0, 0, 0, 0, .75, 0]).tolist()
    model = load_model(checkpoints["cond"])
    expected = sample(model, 30, seed=0, labels=torch.tensor(labels))
    images = np.stack([decode_png(png) for png in table.column("image_png").to_pylist()])
    assert np.array_equal(images, expected.images.numpy())


def test_killed_actor_still_every_id_exactly_once(ray_cluster, s3, checkpoints):
    # Enough shards that the actors are still sampling when the first file lands (they sample ahead of the writes).
    args = ["--checkpoint", "s3://pixelcnn/models/plain", "--num-samples", 480, "--output", "s3://pixelcnn/samples/kill",
            "--sampler", "naive", "--rows-per-file", 16, "--batch-size", 8, "--num-actors", 2, "--address", ray_cluster.address]
    kill_an_actor_midway("generate.py", args, env=ray_cluster.env, title="SampleShards", temp_dir=ray_cluster.temp_dir,
                         started=lambda: any(k.endswith(".parquet") for k in s3_keys(s3.client, "pixelcnn", "samples/kill/")))
    table, files = read_rows(s3, "samples/kill/")
    assert table.column("id").to_pylist() == list(range(480))  # sorted: every id once, none twice
    assert len(files) == 30


def test_a_failure_inside_ray_data_is_named_by_its_own_message():
    """Ray Data re-raises an error of its own or Ray Core's code "from" an empty SystemException: the
    one error line must be the error's message, not "SystemException"."""
    from ray.data.exceptions import SystemException

    from jobs.errors import root_cause

    try:
        try:
            raise ValueError("Traceback (most recent call last):\n  ...\nValueError: num_cpus cannot be negative")
        except ValueError as error:
            raise error.with_traceback(None) from SystemException()  # as ray.data.exceptions does
    except ValueError as error:
        assert root_cause(error) == "ValueError: num_cpus cannot be negative"
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = KeyError("inner")
    assert root_cause(wrapped) == "'inner'"


def test_an_io_error_ray_data_retried_is_named_by_its_own_message_not_the_retry_advice():
    """Ray Data appends "Failed to ... after 10/10 attempts" and advice on retry settings to an I/O error it
    retried (its own function does it here): the line is the error, so that a lost S3 endpoint is seen."""
    from ray.data._internal.util import _annotate_exception_with_retry_context

    from jobs.errors import UNREACHABLE, root_cause

    message = "AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect to server"
    error = _annotate_exception_with_retry_context(OSError(message), description="open output stream for x",
                                                   attempts=10, max_attempts=10, total_backoff_s=9.0,
                                                   exception_str=message)
    assert "To change retry attempts" in str(error)  # Ray still words it so
    assert root_cause(error) == message and UNREACHABLE.search(root_cause(error))


RAY_DATA_ACTOR_FAILURE = """
import os
import ray
from jobs.errors import root_cause

class Fails:
    def __call__(self, batch):
        try:
            {}["levels"]
        except KeyError as error:
            raise OverflowError("the user's own message") from error

ray.init(address=os.environ["RAY_ADDRESS"])  # the session's cluster
try:
    ray.data.from_items([{"x": 1}]).map_batches(Fails, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1),
                                                num_cpus=0.5).materialize()
except Exception as error:
    print("ROOT CAUSE:", root_cause(error))
"""


def test_an_actors_error_is_named_by_its_own_message(ray_cluster):
    """A failed Ray Data task's error text chains the user's tracebacks (here an error raised from
    another) and then Ray's wrapper with its advice on retries: the one error line is the user's error."""
    proc = subprocess.run([PYTHON, "-c", RAY_DATA_ACTOR_FAILURE], cwd=REPO, env=ray_cluster.env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROOT CAUSE:")]
    assert lines == ["ROOT CAUSE: OverflowError: the user's own message"], proc.stdout[-2000:] + proc.stderr[-3000:]


def test_sigterm_and_ctrl_c_are_one_line_and_the_rerun_completes(checkpoints, local_ray_env, ray_cluster, tmp_path):
    """SIGTERM (what `ray job stop` and Kubernetes send) mid-run, then Ctrl-C mid-rerun: each ends with status
    143 or 130 and one line, leaves only whole part files, and the same command again fills in the rest,
    every id once. SIGTERM stops a job on the session's cluster (as `ray job stop` does), Ctrl-C one on its own
    in-process Ray (as on a laptop), started from another folder with a relative --output: its part files
    show that the workers import `jobs` (the sink's Storage travels to them) wherever the driver started. The
    last rerun joins the session's cluster."""
    out = tmp_path / "out"
    args = ["--checkpoint", checkpoints["plain"], "--num-samples", 1200, "--rows-per-file", 40]
    parts = lambda: len(list(out.glob("part-*.parquet"))) if out.exists() else 0  # noqa: E731
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for sig, status, line, env, cwd, output in (
            (signal.SIGTERM, 143, "error: terminated: rerun the same command to resume", ray_cluster.env, REPO, out),
            (signal.SIGINT, 130, "error: interrupted: rerun the same command to resume", local_ray_env, elsewhere, "../out")):
        written = parts()
        stop_job("generate.py", *args, "--output", output, env=env, sig=sig, status=status, line=line, cwd=cwd,
                 ready=lambda: parts() > written, waiting_for="a new part file")
        assert not list(out.glob(".tmp-*")), "a half-written file was left behind"
        assert 0 < len(pads.dataset(str(out), format="parquet").to_table()) < 1200, "stopped too late to test a resume"
    run_job("generate.py", *args, "--output", out, env=ray_cluster.env)
    assert sorted(pads.dataset(str(out), format="parquet").to_table().column("id").to_pylist()) == list(range(1200))


@pytest.mark.parametrize("case", ["missing", "corrupt", "not-a-checkpoint", "bucket", "zero", "fused-cpu", "label",
                                  "label-probs", "unconditional", "gpus", "cpus", "cpus-zero", "gpus-nan", "seed-range"])
def test_fail_fast(case, s3, checkpoints, ray_cluster, tmp_path):
    """Refused in this process (no start-up per case), before anything is written; the checks of the actors'
    resources connect to the session's cluster."""
    env = ray_cluster.env
    ckpt, out, extra = checkpoints["plain"], tmp_path / "out", []
    if case == "missing":
        ckpt = tmp_path / "nothing"
    elif case == "corrupt":
        ckpt = tmp_path / "bad.pt"
        ckpt.write_bytes(checkpoints["plain"].read_bytes()[:500])
    elif case == "not-a-checkpoint":  # an existing file of another kind, whatever its name
        ckpt = tmp_path / "config.json"
        ckpt.write_text("{}")
    elif case == "bucket":
        out = "s3://no-such-bucket/samples"
    elif case == "zero":
        extra = ["--num-samples", 0]
    elif case == "fused-cpu":
        extra = ["--sampler", "fused"]
    elif case == "label":
        ckpt, extra = checkpoints["cond"], ["--label", 10]
    elif case == "label-probs":  # NaN is neither negative nor a zero sum
        ckpt, extra = checkpoints["cond"], ["--label-probs", ",".join(["nan"] + ["1"] * 9)]
    elif case == "unconditional":
        extra = ["--label", 1]
    elif case == "gpus":  # 4 samples are one shard: one actor, however many are asked for
        extra = ["--gpus-per-actor", 1, "--num-actors", 4]
    elif case == "cpus":  # more than the cluster has: the pool would wait for ever
        extra = ["--cpus-per-actor", 64]
    elif case == "cpus-zero":
        extra = ["--cpus-per-actor", 0]
    elif case == "gpus-nan":  # NaN is neither negative nor more than the cluster has
        extra = ["--gpus-per-actor", "nan"]
    elif case == "seed-range":  # the random streams hash a 64-bit seed
        extra = ["--seed", 2**63]
    proc = run_main("generate.py", "--checkpoint", ckpt, "--output", out, *(extra or ["--num-samples", 4]),
                    *(["--num-samples", 4] if extra and "--num-samples" not in extra else []),
                    "--address", ray_cluster.address, env=env)
    line = one_error_line(proc)
    expected = {
        "missing": "checkpoint not found", "corrupt": "corrupt", "bucket": "bucket 'no-such-bucket' does not exist",
        "not-a-checkpoint": "config.json is corrupt or not a PixelCNN checkpoint",
        "zero": "--num-samples must be >= 1", "fused-cpu": "--sampler fused runs on GPU actors",
        "label": "--label 10 is not a class", "label-probs": "--label-probs needs 10 finite non-negative numbers",
        "unconditional": "unconditional",
        "gpus": "1 GPUs needed for the sampler actors, the cluster has 0",
        "cpus": "65 CPUs needed for the sampler actors and the pipeline's CPU tasks, the cluster has", "cpus-zero": "--cpus-per-actor must be > 0",
        "gpus-nan": "--gpus-per-actor must be >= 0",
        "seed-range": "--seed must be a 64-bit integer (-2**63 to 2**63 - 1)",
    }[case]
    assert expected in line, line
    assert "usage:" not in proc.stderr and "If you are seeing this error" not in line, proc.stderr  # torch's advice cut
    if case != "bucket":
        assert not out.exists(), "a refused request must write nothing, not even its folder"
