"""jobs/train.py end to end: Ray Train DDP on a real local Ray cluster, S3 on a loopback SeaweedFS server."""

import io
import json
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import (MNIST_ROOT, PYTHON, REPO, base_env, cluster_pids, last_json_line, one_error_line, process_titles,
                      ray_info_lines, run_job, run_main, s3_keys, start_job, stop_job)
from pixelcnn import PixelCNN, load_model

pytestmark = pytest.mark.slow

SMALL = [
    "--dataset", "mnist", "--data-dir", MNIST_ROOT, "--subset", 256, "--test-subset", 64, "--hidden", 8,
    "--blocks", 1, "--batch-size", 32, "--epochs", 1, "--grid-samples", 4, "--log-every", 2,
]


def s3_model(s3, key):
    data = s3.client.get_object(Bucket="pixelcnn", Key=key)["Body"].read()
    return torch.load(io.BytesIO(data), weights_only=True)


def resumed_from(out: str) -> list[int]:
    return [int(m) for m in re.findall(r"resuming from step (\d+)", out)]


def in_process_run(args, run_dir):
    """The same flags trained by the library's single-process loop (``pixelcnn.training.train``, no Ray):
    what one worker computes."""
    from jobs.train import parse_args
    from pixelcnn.training import Runtime, train

    cfg, _ = parse_args([str(a) for a in args])
    train(cfg, Runtime(str(run_dir), log=lambda *a, **k: None))
    return torch.load(run_dir / "model.pt", weights_only=True)


# Two DDP workers in float64 (so the comparison with one process is exact to rounding): 8 steps an epoch.
DDP = [*SMALL, "--max-steps", 24, "--epochs", 3, "--checkpoint-every", 4, "--precision", "float64"]


def test_two_ddp_workers_on_s3_resume_a_killed_worker_and_match_one_process(ray_cluster, s3, tmp_path):
    """Ray Train DDP with checkpoints on S3: a worker SIGKILLed after the first checkpoint, the group restarts
    from it, and the run still ends with the weights one process computes uninterrupted."""
    args = [*DDP, "--num-workers", 2, "--max-failures", 2, "--storage", "s3://pixelcnn/runs", "--name", "ddp2"]
    job = subprocess.Popen([PYTHON, "jobs/train.py", *map(str, args)], cwd=REPO, env=ray_cluster.env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The same flags uninterrupted in one process, trained in this process meanwhile: the job mostly waits on Ray.
    reference = ThreadPoolExecutor(1)
    once = reference.submit(in_process_run, [*DDP, "--storage", tmp_path, "--name", "one"], tmp_path / "one")
    try:
        deadline = time.time() + 180
        # Ray Train registers a checkpoint (and rewrites its snapshot) a little after the upload:
        # kill only once one is registered, so a restart has something to resume from.
        while "runs/ddp2/checkpoint_manager_snapshot.json" not in s3_keys(s3.client, "pixelcnn", "runs/ddp2/"):
            assert time.time() < deadline and job.poll() is None, "no checkpoint appeared"
            time.sleep(0.1)
        workers = [pid for pid, title in process_titles(cluster_pids(ray_cluster.temp_dir)).items()
                   if title.startswith("ray::RayTrainWorker")]
        assert len(workers) == 2, workers
        subprocess.run(["kill", "-9", str(workers[-1])], check=True)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
        reference.shutdown()
    assert job.returncode == 0, out[-3000:]
    assert resumed_from(out) and min(resumed_from(out)) >= 4, "the restarted workers must continue from a checkpoint"
    final = last_json_line(out)
    assert final["step"] == 24 and final["done"] and final["world_size"] == 2 and 0 < final["test_bits_per_dim"] < 8.5
    keys = s3_keys(s3.client, "pixelcnn", "runs/ddp2/")
    for name in ("model.pt", "metrics.jsonl", "config.json", "samples_epoch_001.png", "samples_epoch_003.png",
                 "checkpoint_000000020/model.pt", "checkpoint_000000024/model.pt"):
        assert f"runs/ddp2/{name}" in keys, name
    body = s3.client.get_object(Bucket="pixelcnn", Key="runs/ddp2/metrics.jsonl")["Body"].read().decode()
    metrics = [json.loads(line) for line in body.splitlines()]
    assert [m["step"] for m in metrics] == [4, 8, 12, 16, 20, 24]  # each report once, across the restart
    assert all({"train_bits_per_dim", "test_bits_per_dim", "images_per_s", "lr"} <= m.keys() for m in metrics)

    one = once.result()["training"]["raw_state"]
    two = s3_model(s3, "runs/ddp2/model.pt")["training"]["raw_state"]
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-9, rtol=0), name
    # ... and training moved them: the comparison is not between two untouched initialisations.
    torch.manual_seed(0)
    init = PixelCNN(hidden=8, blocks=1).double().state_dict()
    assert any(not torch.allclose(init[n], one[n]) for n in init)
    assert load_model(tmp_path / "one").config.hidden == 8


# Long enough (in reports) to be stopped three times; a checkpoint every 4 steps.
RESUMED = [*SMALL[:-4], "--grid-samples", 0, "--log-every", 4, "--max-steps", 48, "--epochs", 6, "--checkpoint-every", 4,
           "--keep-checkpoints", 20]


def newest_checkpoint(run) -> int:
    return max((int(p.name.split("_")[1]) for p in run.glob("checkpoint_0*")), default=0) if run.exists() else 0


@pytest.fixture(scope="module")
def budget_run(ray_cluster, tmp_path_factory):
    """A --max-time run (test_max_time_fixes_the_steps_in_config_json_before_training), started in the
    background by resumed_run beside its first start (each job mostly waits on Ray): (its storage, its flags,
    the job)."""
    storage = tmp_path_factory.mktemp("budget")
    args = ["--dataset", "synthetic", "--test-subset", 64, "--hidden", 8, "--blocks", 1, "--batch-size", 32,
            "--grid-samples", 0, "--log-every", 1000, "--max-time", "1s", "--storage", storage, "--name", "budget"]
    job = start_job("train.py", *args, env=ray_cluster.env)
    yield storage, args, job
    job.stop()


@pytest.fixture(scope="module")
def short_run(ray_cluster, tmp_path_factory):
    """The resumed run's recipe for 4 steps under another name, with Ray's default PreemptionWatcher
    (conftest.base_env turns it off) and PIXELCNN_DEBUG=1 (test_a_rerun_resumes_from_the_newest_checkpoint_on_disk),
    started in the background by resumed_run beside its last start: (its storage, the job)."""
    storage = tmp_path_factory.mktemp("newest")
    env = {**ray_cluster.env, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "PIXELCNN_DEBUG": "1"}
    job = start_job("train.py", *RESUMED, "--storage", storage, "--name", "short", "--max-steps", 4, env=env)
    yield storage, job
    job.stop()


@pytest.fixture(scope="module")
def resumed_run(ray_cluster, tmp_path_factory, request, budget_run):
    """One run stopped three ways, each after a checkpoint newer than the last stop's, and resumed by the same
    command each time: its driver SIGKILLed (the laptop that ran it died), SIGTERM (``ray job stop``,
    Kubernetes), Ctrl-C. Yields the run folder, its flags, what each start printed and the newest checkpoint
    at each stop."""
    storage = tmp_path_factory.mktemp("resumed")
    run = storage / "r"
    args = [*map(str, RESUMED), "--storage", str(storage), "--name", "r"]
    starts = []
    for sig, status, line in ((None, 0, ""),
                              (signal.SIGTERM, 143, "error: terminated: rerun the same command to resume"),
                              (signal.SIGINT, 130, "error: interrupted: rerun the same command to resume")):
        seen = newest_checkpoint(run)
        # Once Ray Train has registered a checkpoint newer than the last stop's (its snapshot is rewritten
        # a little after the upload), so a restart has something new to resume from.
        ready = lambda: (run / "checkpoint_manager_snapshot.json").exists() and newest_checkpoint(run) > seen  # noqa: E731
        printed = stop_job("train.py", *args, env=ray_cluster.env, sig=sig, status=status, line=line, ready=ready,
                           waiting_for="new checkpoint")
        starts.append((printed, newest_checkpoint(run)))
    request.getfixturevalue("short_run")  # started beside the last start only, to keep this fixture under 90 s
    last = run_job("train.py", *args, env=ray_cluster.env)
    starts.append((last.stdout, newest_checkpoint(run)))
    return run, args, starts


def test_a_run_stopped_by_sigkill_sigterm_and_ctrl_c_resumes_each_time(resumed_run):
    run, _, starts = resumed_run
    assert not resumed_from(starts[0][0]), "the first start found a checkpoint"
    for (printed, _), (_, before) in zip(starts[1:], starts):
        assert resumed_from(printed) and resumed_from(printed)[0] >= before, "a start did not resume from the newest checkpoint"
    assert not list(run.rglob(".tmp-*")), "a half-written file was left behind"
    assert last_json_line(starts[-1][0])["step"] == 48
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(4, 49, 4))  # every report once, across four starts


def test_rerun_of_finished_run_trains_nothing(resumed_run, tmp_path):
    run, args, _ = resumed_run
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for shorter in ([], ["--max-steps", 1]):  # the same request again, or one that asks for less: no Ray needed
        proc = run_main("train.py", *args, *shorter, env=base_env())
        assert "already trained to step 48 (6 epochs), as far as --epochs/--max-steps/--max-time ask: nothing to train" in proc.stdout
        assert last_json_line(proc.stdout)["step"] == 48
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_finished_runs_corrupt_model_is_restored_from_its_checkpoint(resumed_run, tmp_path):
    run, args, _ = resumed_run
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    args = [a if a != str(run.parent) else str(tmp_path) for a in args]
    good = (copy / "model.pt").read_bytes()
    (copy / "model.pt").write_bytes(good[:100])  # truncated
    proc = run_main("train.py", *args, env=base_env())  # a finished run: restored, nothing trains, no Ray
    assert proc.returncode == 0 and "was unusable" in proc.stdout
    assert "restored it from checkpoint_000000048/model.pt" in proc.stdout
    assert load_model(copy).config.hidden == 8
    for folder in copy.glob("checkpoint_0*"):
        (folder / "model.pt").write_bytes(b"broken")
    (copy / "model.pt").write_bytes(b"broken")
    proc = run_main("train.py", *args, env=base_env())
    assert "and the run holds no intact checkpoint_*/model.pt to restore it from" in one_error_line(proc)


NOTICE = "has constructor arguments in the object store and max_restarts > 0"


def test_a_rerun_resumes_from_the_newest_checkpoint_on_disk(resumed_run, short_run, ray_cluster):
    """The driver died after the run folder's model.pt (a step after 4) was written and before Ray Train
    registered that step's checkpoint: the rerun resumes from that step, not from the last registered step 4."""
    run, args, _ = resumed_run
    storage, short = short_run
    args = [a if a != str(run.parent) else str(storage) for a in args]
    # The PreemptionWatcher on, as Ray's default has it (conftest.base_env turns it off): NOTICE is about that actor.
    env = {**ray_cluster.env, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
    # short_run, with PIXELCNN_DEBUG=1, shows Ray's INFO lines, which a job leaves out by default (the run below).
    proc = short.result()
    assert "Reporting training result" in proc.stderr and "Setting up process group" in proc.stderr
    assert NOTICE in proc.stderr  # Ray's ERROR-level line about its own actor, shown only here (jobs.cluster.RAY_NOTICES)
    # The resumed run's first checkpoint after step 4 (the same recipe, so the same weights): usually step 8, but
    # Ray Train deletes a checkpoint folder it never registered, as a stop can leave step 8's.
    newer = min(int(p.parent.name.split("_")[1]) for p in run.glob("checkpoint_0*/model.pt")
                if int(p.parent.name.split("_")[1]) > 4)
    shutil.copy(run / f"checkpoint_{newer:09d}" / "model.pt", storage / "short" / "model.pt")  # newer than Ray's latest
    proc = run_job("train.py", *args, "--max-steps", newer + 4, "--name", "short", env=env)
    assert f"resuming from step {newer}" in proc.stdout
    assert not ray_info_lines(proc.stdout + proc.stderr) and NOTICE not in proc.stderr
    assert [m["step"] for m in map(json.loads, (storage / "short" / "metrics.jsonl").read_text().splitlines())] == \
        list(range(4, newer + 5, 4))


def test_max_time_fixes_the_steps_in_config_json_before_training(budget_run):
    """The driver measures what --max-time buys on a worker's resources (a Ray task) and records it in
    config.json before the first step; the run trains exactly those steps; the same
    command again trains nothing (the stored steps are used, not a new measurement)."""
    storage, args, job = budget_run
    proc = job.result()
    steps = json.loads((storage / "budget" / "config.json").read_text())["schedule_steps"]
    final = last_json_line(proc.stdout)
    assert f"--max-time 1 s buys {steps} steps" in proc.stdout and final["step"] == steps and final["done"]
    again = run_main("train.py", *args, env=base_env())
    assert f"already trained to step {steps}" in again.stdout and "buys" not in again.stdout


def test_fail_fast_missing_bucket(s3, local_ray_env):
    env = {**local_ray_env, **s3.env}
    proc = run_main("train.py", *SMALL, "--storage", "s3://no-such-bucket/runs", env=env)
    assert "bucket 'no-such-bucket' does not exist" in one_error_line(proc)


def test_fail_fast_missing_data_root(local_ray_env, tmp_path):
    """The one refusal of this job run as a real process: its exit status and its one line."""
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
    proc = run_main("train.py", *args, "--download", "--storage", tmp_path / "runs", env=env)
    line = one_error_line(proc)
    assert "mnist not found under data root" in line and "Error downloading" in line, line
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs" / "mnist-pixelcnn-h8-b1").exists()


def test_fail_fast_more_workers_than_cluster(ray_cluster, tmp_path):
    storage = tmp_path / "runs"
    proc = run_main("train.py", *SMALL, "--num-workers", 8, "--storage", storage, "--name", "big", "--address", ray_cluster.address, env=ray_cluster.env)
    assert "needs 8 CPU (cluster has 4)" in one_error_line(proc)
    assert not storage.exists(), "a refused run must write nothing, not even its storage folder"


def test_fail_fast_contradicting_config(local_ray_env, tmp_path):
    run_dir = tmp_path / "runs" / "taken"
    run_dir.mkdir(parents=True)
    stored = {"dataset": "mnist", "subset": 256, "model": "pixelcnn", "hidden": 16, "blocks": 1, "norm": "none",
              "conditional": False, "batch_size": 32, "seed": 0}
    (run_dir / "config.json").write_text(json.dumps(stored))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 8, "epoch": 1}) + "\n")  # it has trained
    proc = run_main("train.py", *SMALL, "--storage", tmp_path / "runs", "--name", "taken", env=local_ray_env)
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
    proc = run_main("train.py", flag, value, env=local_ray_env)
    assert message in one_error_line(proc) and "usage:" not in proc.stderr, proc.stderr
