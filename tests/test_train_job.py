"""jobs/train.py end to end: Ray Train DDP on a real local Ray cluster, S3 on a loopback moto server."""

import io
import json
import re
import subprocess
import time

import pytest
import torch

from conftest import interrupt_job, one_error_line, MNIST_ROOT, PYTHON, REPO, cluster_pids, last_json_line, process_titles, run_job, s3_keys
from pixelcnn import load_model

pytestmark = pytest.mark.slow

SMALL = [
    "--dataset", "mnist", "--data-dir", MNIST_ROOT, "--subset", 256, "--test-subset", 64, "--hidden", 8,
    "--blocks", 1, "--batch-size", 32, "--epochs", 1, "--grid-samples", 4, "--log-every", 2,
]


def s3_model(s3, key):
    data = s3.client.get_object(Bucket="pixelcnn", Key=key)["Body"].read()
    return torch.load(io.BytesIO(data), weights_only=True)


def test_two_ddp_workers_checkpoint_to_s3_and_match_one_worker(ray_cluster, s3, local_ray_env, tmp_path):
    proc = run_job(
        "train.py", *SMALL, "--max-steps", 4, "--checkpoint-every", 2, "--num-workers", 2,
        "--storage", "s3://pixelcnn/runs", "--name", "ddp2", "--address", ray_cluster.address, env=ray_cluster.env,
    )
    final = last_json_line(proc.stdout)
    assert final["step"] == 4 and final["done"] and 0 < final["test_bits_per_dim"] < 8.5
    keys = s3_keys(s3.client, "pixelcnn", "runs/ddp2/")
    for name in ("model.pt", "metrics.jsonl", "config.json", "samples_epoch_001.png"):
        assert f"runs/ddp2/{name}" in keys
    assert "runs/ddp2/checkpoint_000000002/model.pt" in keys and "runs/ddp2/checkpoint_000000004/model.pt" in keys
    metrics = [json.loads(line) for line in s3.client.get_object(Bucket="pixelcnn", Key="runs/ddp2/metrics.jsonl")["Body"].read().decode().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert all({"train_bits_per_dim", "test_bits_per_dim", "images_per_s", "lr"} <= m.keys() for m in metrics)

    # The same global batch on one worker (in-process Ray, local storage) reaches the same weights.
    run_job("train.py", *SMALL, "--max-steps", 4, "--num-workers", 1, "--storage", tmp_path, "--name", "one", env=local_ray_env)
    two = s3_model(s3, "runs/ddp2/model.pt")["model_state"]
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["model_state"]
    for name in one:
        assert torch.allclose(one[name], two[name], atol=2e-5, rtol=1e-4), name
    # ... and training moved them: the comparison is not between two untouched initialisations.
    torch.manual_seed(0)
    from pixelcnn import PixelCNN
    init = PixelCNN(hidden=8, blocks=1).state_dict()
    assert any(not torch.allclose(init[n], one[n]) for n in one)
    model = load_model(tmp_path / "one")
    assert model.config.hidden == 8


def test_rerun_of_finished_run_trains_nothing(ray_cluster, s3):
    args = [*SMALL, "--max-steps", 2, "--storage", "s3://pixelcnn/runs", "--name", "rerun", "--address", ray_cluster.address]
    run_job("train.py", *args, env=ray_cluster.env)
    before = {k: s3.client.head_object(Bucket="pixelcnn", Key=k)["ETag"] for k in s3_keys(s3.client, "pixelcnn", "runs/rerun/")}
    for shorter in ([], ["--max-steps", 1]):  # the same request again, or one that asks for less
        proc = run_job("train.py", *args, *shorter, env=ray_cluster.env)
        assert "already trained to step 2 (0 epochs), as far as --epochs/--max-steps ask: nothing to train" in proc.stdout
        assert last_json_line(proc.stdout)["step"] == 2
        after = {k: s3.client.head_object(Bucket="pixelcnn", Key=k)["ETag"] for k in s3_keys(s3.client, "pixelcnn", "runs/rerun/")}
        assert after == before


def test_killed_worker_resumes_from_checkpoint(ray_cluster, s3):
    args = [
        "--dataset", "mnist", "--data-dir", MNIST_ROOT, "--subset", 512, "--test-subset", 32, "--hidden", 32,
        "--blocks", 4, "--batch-size", 64, "--epochs", 5, "--checkpoint-every", 4, "--grid-samples", 0,
        "--num-workers", 2, "--cpus-per-worker", 1, "--max-failures", 2, "--storage", "s3://pixelcnn/runs",
        "--name", "kill", "--address", ray_cluster.address,
    ]
    job = subprocess.Popen([PYTHON, "jobs/train.py", *map(str, args)], cwd=REPO, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        # Ray Train registers a checkpoint (and rewrites its snapshot) a little after the upload:
        # kill only once one is registered, so a restart has something to resume from.
        while "runs/kill/checkpoint_manager_snapshot.json" not in s3_keys(s3.client, "pixelcnn", "runs/kill/"):
            assert time.time() < deadline and job.poll() is None, "no checkpoint appeared"
            time.sleep(0.2)
        workers = [pid for pid, title in process_titles(cluster_pids(ray_cluster.temp_dir)).items() if title.startswith("ray::RayTrainWorker")]
        assert len(workers) == 2, workers
        subprocess.run(["kill", "-9", str(workers[-1])], check=True)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    resumed = [int(m) for m in re.findall(r"resuming from step (\d+)", out)]
    assert resumed and min(resumed) >= 4, "the restarted workers must continue from a checkpoint, not step 0"
    assert last_json_line(out)["step"] == 40


def test_killed_driver_rerun_resumes(ray_cluster, s3):
    """The driver dies (say, the laptop that ran it): the same command picks up from the checkpoint."""
    args = [
        "--dataset", "mnist", "--data-dir", MNIST_ROOT, "--subset", 512, "--test-subset", 32, "--hidden", 32,
        "--blocks", 4, "--batch-size", 64, "--epochs", 3, "--checkpoint-every", 4, "--grid-samples", 0,
        "--storage", "s3://pixelcnn/runs", "--name", "driver", "--address", ray_cluster.address,
    ]
    job = subprocess.Popen([PYTHON, "jobs/train.py", *map(str, args)], cwd=REPO, env=ray_cluster.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while "runs/driver/checkpoint_manager_snapshot.json" not in s3_keys(s3.client, "pixelcnn", "runs/driver/"):
            assert time.time() < deadline and job.poll() is None, "no checkpoint appeared"
            time.sleep(0.2)
    finally:
        job.kill()
        job.wait()
    proc = run_job("train.py", *args, env=ray_cluster.env)
    resumed = [int(m) for m in re.findall(r"resuming from step (\d+)", proc.stdout)]
    assert resumed and resumed[0] >= 4
    assert last_json_line(proc.stdout)["step"] == 24


def test_ctrl_c_is_one_line_and_the_rerun_resumes(local_ray_env, tmp_path):
    """Ray Train's own Ctrl-C handler aborts the run and exits from inside fit(): the job still ends with
    one error line and status 130, and the same command resumes from the last checkpoint."""
    args = [
        "--dataset", "mnist", "--data-dir", MNIST_ROOT, "--subset", 512, "--test-subset", 32, "--hidden", 32,
        "--blocks", 4, "--batch-size", 64, "--epochs", 3, "--checkpoint-every", 4, "--grid-samples", 0,
        "--storage", tmp_path, "--name", "ctrl-c",
    ]
    interrupt_job("train.py", *args, env=local_ray_env, waiting_for="checkpoint",
                  ready=(tmp_path / "ctrl-c" / "checkpoint_manager_snapshot.json").exists)
    proc = run_job("train.py", *args, env=local_ray_env)
    resumed = [int(m) for m in re.findall(r"resuming from step (\d+)", proc.stdout)]
    assert resumed and resumed[0] >= 4
    assert last_json_line(proc.stdout)["step"] == 24


def test_ray_job_submit(ray_cluster, s3):
    cmd = [
        f"{REPO}/.venv/bin/ray" if (REPO / ".venv/bin/ray").exists() else "ray", "job", "submit",
        "--address", ray_cluster.dashboard, "--working-dir", ".", "--", "python", "jobs/train.py",
        *map(str, SMALL), "--max-steps", 2, "--storage", "s3://pixelcnn/runs", "--name", "submitted",
    ]
    proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '"test_bits_per_dim"' in proc.stdout
    assert "runs/submitted/model.pt" in s3_keys(s3.client, "pixelcnn", "runs/submitted/")


def test_fail_fast_missing_bucket(s3, local_ray_env):
    env = {**local_ray_env, **s3.env}
    proc = run_job("train.py", *SMALL, "--storage", "s3://no-such-bucket/runs", env=env, check=False)
    assert "bucket 'no-such-bucket' does not exist" in one_error_line(proc)


def test_fail_fast_missing_data_root(local_ray_env, tmp_path):
    args = [a if a != MNIST_ROOT else tmp_path / "missing" for a in SMALL]
    proc = run_job("train.py", *args, "--storage", tmp_path / "runs", env=local_ray_env, check=False)
    assert "does not exist" in one_error_line(proc)
    assert not (tmp_path / "runs" / "mnist-pixelcnn-h8-b1").exists()


def test_fail_fast_failed_download(local_ray_env, tmp_path):
    """--download runs on the driver first: a download that fails is one error line, before any worker
    (no retries under --max-failures) and before the run folder exists. Proxies on a closed loopback
    port make every download fail at once, without touching the network."""
    args = [a if a != MNIST_ROOT else tmp_path / "data" for a in SMALL]
    dead = "http://127.0.0.1:9"
    env = {k: v for k, v in local_ray_env.items() if k.lower() != "no_proxy"}
    env.update({k: dead for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    proc = run_job("train.py", *args, "--download", "--storage", tmp_path / "runs", env=env, check=False, timeout=120)
    line = one_error_line(proc)
    assert "mnist not found under data root" in line and "Error downloading" in line, line
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs" / "mnist-pixelcnn-h8-b1").exists()


def test_fail_fast_more_workers_than_cluster(ray_cluster, tmp_path):
    storage = tmp_path / "runs"
    proc = run_job("train.py", *SMALL, "--num-workers", 8, "--storage", storage, "--name", "big", "--address", ray_cluster.address, env=ray_cluster.env, check=False, timeout=120)
    assert "needs 8 CPU (cluster has 4)" in one_error_line(proc)
    assert not storage.exists(), "a refused run must write nothing, not even its storage folder"


def test_fail_fast_contradicting_config(local_ray_env, tmp_path):
    run_dir = tmp_path / "runs" / "taken"
    run_dir.mkdir(parents=True)
    stored = {"dataset": "mnist", "subset": 256, "model": "pixelcnn", "hidden": 16, "blocks": 1, "norm": "none",
              "conditional": False, "batch_size": 32, "seed": 0}
    (run_dir / "config.json").write_text(json.dumps(stored))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 8, "epoch": 1}) + "\n")  # it has trained
    proc = run_job("train.py", *SMALL, "--storage", tmp_path / "runs", "--name", "taken", env=local_ray_env, check=False)
    assert "--hidden 16 -> 8" in one_error_line(proc)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "metrics.jsonl"]


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", 0, "--batch-size must be >= 1"),
    ("--subset", 0, "--subset must be >= 1"),
    ("--grid-samples", -1, "--grid-samples must be >= 0"),
    ("--cpus-per-worker", 0, "--cpus-per-worker must be > 0"),
    ("--subset", 10, "--batch-size 128 exceeds --subset 10"),
    ("--grad-clip", -1, "--grad-clip must be >= 0"),
    ("--batch-siz", 64, "unrecognized arguments: --batch-siz"),  # a prefix is not taken for --batch-size
    ("--name", "../elsewhere", "--name must be one folder name"),  # the run would land outside --storage
    ("--name", "..", "--name must be one folder name"),
    ("--seed", 2**63, "--seed must be a 64-bit integer"),  # the one bound of every seed
    ("--seed", -2**63 - 1, "--seed must be a 64-bit integer"),
    ("--min-workers", 2, "--min-workers must be between 1 and --num-workers 1"),
])
def test_bad_flags(local_ray_env, flag, value, message):
    """Refused by the driver, before any worker could spend time on them, in one line (no usage dump)."""
    proc = run_job("train.py", flag, value, env=local_ray_env, check=False)
    assert message in one_error_line(proc) and "usage:" not in proc.stderr, proc.stderr
