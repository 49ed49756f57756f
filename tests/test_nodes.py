"""Losing a whole node, on a real multi-node Ray cluster on loopback (conftest's ``nodes``: a head with no
CPUs and worker raylets of one CPU each, killed as Ray's own node-failure tests kill them).

* Elastic training (--min-workers 1 --num-workers 2): a node goes, the run continues with one worker
  without waiting for a new node, grows back to two when one returns, and ends with the weights of an
  uninterrupted run.
* Without --min-workers, on a cluster with room left, the run restarts at full size.
* jobs/generate.py writes every id exactly once across a node kill.
"""

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import torch

from conftest import PYTHON, REPO, last_json_line, randomize, s3_keys
from jobs.train import parse_args
from pixelcnn import PixelCNN
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint
from pixelcnn.training import Runtime, train

pytestmark = pytest.mark.slow

# Cheap steps (12x12 images), but 200 test images evaluated at every report (every 10 steps): reports do not
# change the weights, and they keep the run going long enough for a node to go and come back.
RECIPE = ["--dataset", "synthetic", "--subset", 640, "--hidden", 8, "--blocks", 1,
          "--batch-size", 64, "--epochs", 100, "--max-steps", 250, "--grid-samples", 0, "--log-every", 50,
          "--precision", "float64"]  # float32's rounding grows to ~1e-2 over 250 steps between worker counts
ELASTIC = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}  # how long a worker group may take to start


def metrics(s3, name):
    body = s3.client.get_object(Bucket="pixelcnn", Key=f"runs/{name}/metrics.jsonl")["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def wait_for(condition, what, job, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline and job.poll() is None, f"{what} did not happen"
        time.sleep(0.5)


def reported_sizes(s3, name):
    try:
        return [m["world_size"] for m in metrics(s3, name)]
    except s3.client.exceptions.NoSuchKey:
        return []


def start(nodes, *args, log, env=None):
    """The job in the background, its output in ``log`` (read it with ``finish``)."""
    return subprocess.Popen([PYTHON, "jobs/train.py", *map(str, args), "--address", nodes.address], cwd=REPO,
                            env={**nodes.job_env, **(env or {})}, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(job, log, timeout=300) -> str:
    try:
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
    out = log.read_text()
    assert job.returncode == 0, out[-5000:]
    return out


def test_elastic_training_shrinks_without_waiting_and_grows_back(nodes, s3, tmp_path):
    for _ in range(2):
        nodes.add(cpus=1)
    # The same recipe uninterrupted in one process (pixelcnn.training.train, no Ray; reports do not change the
    # weights), trained in this process meanwhile: the job mostly waits on Ray (a lost node, restarts).
    cfg, _ = parse_args([str(a) for a in [*RECIPE, "--test-subset", 16]])
    uninterrupted = ThreadPoolExecutor(1)
    once = uninterrupted.submit(train, cfg, Runtime(str(tmp_path / "once"), log=lambda *a, **k: None))
    name = "elastic"
    job = start(nodes, *RECIPE, "--checkpoint-every", 10, "--num-workers", 2, "--min-workers", 1,
                "--cpus-per-worker", 1, "--resize-interval", 2, "--max-failures", 5, "--test-subset", 200, "--storage", "s3://pixelcnn/runs",
                "--name", name, env=ELASTIC, log=tmp_path / "elastic.log")
    try:
        wait_for(lambda: f"runs/{name}/checkpoint_manager_snapshot.json" in s3_keys(s3.client, "pixelcnn", f"runs/{name}/"),
                 "a first checkpoint", job)
        victim = nodes.node_of("RayTrainWorker")
        assert victim is not None and reported_sizes(s3, name)[0] == 2
        nodes.kill(victim)  # the cluster has no room for two workers now
        wait_for(lambda: 1 in reported_sizes(s3, name), "a report by one worker", job)
        nodes.add(cpus=1)  # capacity returns
        wait_for(lambda: reported_sizes(s3, name)[-1] == 2 and 1 in reported_sizes(s3, name), "growing back to two", job)
    finally:
        out = finish(job, tmp_path / "elastic.log")
        once.result()
        uninterrupted.shutdown()
    sizes = reported_sizes(s3, name)
    first_one, last_one = sizes.index(1), len(sizes) - 1 - sizes[::-1].index(1)
    assert set(sizes[:first_one]) == {2} and set(sizes[first_one:last_one + 1]) == {1} and set(sizes[last_one + 1:]) == {2}
    steps = [m["step"] for m in metrics(s3, name)]
    assert steps == sorted(set(steps)) and steps[-1] == 250  # each report once, in order
    assert "resuming from step" in out

    # The uninterrupted run's weights.
    data = s3.client.get_object(Bucket="pixelcnn", Key=f"runs/{name}/model.pt")["Body"].read()
    (tmp_path / "elastic.pt").write_bytes(data)
    elastic = torch.load(tmp_path / "elastic.pt", weights_only=True)["training"]["raw_state"]
    once = torch.load(tmp_path / "once" / "model.pt", weights_only=True)["training"]["raw_state"]
    for key, value in once.items():
        assert torch.allclose(elastic[key], value, atol=1e-9, rtol=0), key


def test_without_min_workers_a_lost_node_restarts_at_full_size(nodes, s3, tmp_path):
    while len(nodes.workers) < 3:
        nodes.add(cpus=1)
    name = "fixed"
    job = start(nodes, *RECIPE, "--max-steps", 120, "--checkpoint-every", 10, "--test-subset", 64, "--num-workers", 2, "--cpus-per-worker", 1,
                "--storage", "s3://pixelcnn/runs", "--name", name, log=tmp_path / "fixed.log")
    try:
        wait_for(lambda: f"runs/{name}/checkpoint_manager_snapshot.json" in s3_keys(s3.client, "pixelcnn", f"runs/{name}/"),
                 "a first checkpoint", job)
        nodes.kill(nodes.node_of("RayTrainWorker"))
    finally:
        out = finish(job, tmp_path / "fixed.log")
    assert "resuming from step" in out and set(reported_sizes(s3, name)) == {2}
    assert metrics(s3, name)[-1]["step"] == 120


def test_generation_writes_every_id_once_across_a_node_kill(nodes, s3, tmp_path):
    while len(nodes.workers) < 2:
        nodes.add(cpus=1)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pt", checkpoint_dict(randomize(PixelCNN(hidden=8, blocks=1, image_size=(8, 8))), step=1))
    s3.client.upload_file(str(tmp_path / "model.pt"), "pixelcnn", "models/nodes/model.pt")
    # The naive sampler in batches of 8 keeps the actors sampling (~30 s of work) after the first file lands.
    args = ["--checkpoint", "s3://pixelcnn/models/nodes", "--num-samples", 1200, "--rows-per-file", 20,
            "--sampler", "naive", "--batch-size", 8, "--num-actors", 2, "--cpus-per-actor", 0.5, "--output", "s3://pixelcnn/samples/nodes", "--address", nodes.address]
    job = subprocess.Popen([PYTHON, "jobs/generate.py", *map(str, args)], cwd=REPO, env=nodes.job_env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(k.endswith(".parquet") for k in s3_keys(s3.client, "pixelcnn", "samples/nodes/")),
                 "a part file", job)
        victim = nodes.node_of("SampleShards")
        assert victim is not None, "no node runs a SampleShards actor"
        nodes.kill(victim)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    assert last_json_line(out)["total_rows"] == 1200
    fs = pafs.S3FileSystem(endpoint_override=s3.endpoint.split("//")[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing")
    ids = pads.dataset("pixelcnn/samples/nodes", filesystem=fs, format="parquet").to_table(columns=["id"]).column("id")
    assert sorted(ids.to_pylist()) == list(range(1200))
