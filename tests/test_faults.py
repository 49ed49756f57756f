"""Races and faults an adversarial user found: a second live writer with other flags, a lost S3 endpoint, an
oversized --subset, a foreign output folder, a request too large to plan. Each ends in one line, nothing
lost or doubled. (SIGTERM, a corrupt model.pt of a finished run and the newest checkpoint on disk are in
tests/test_train_job.py and tests/test_generate_job.py, beside the runs they reuse.)"""

import json
import shutil
import subprocess
import time

import pyarrow.dataset as pads
import pytest
import torch

from conftest import MNIST_ROOT, PYTHON, REPO, one_error_line, randomize, run_job, run_main, start_seaweedfs, stop_processes
from pixelcnn import PixelCNN
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint

pytestmark = pytest.mark.slow

SMALL = ["--dataset", "mnist", "--data-dir", MNIST_ROOT, "--subset", 256, "--test-subset", 32, "--hidden", 8,
         "--blocks", 1, "--batch-size", 32, "--grid-samples", 0, "--log-every", 4]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, checkpoint_dict(randomize(PixelCNN(hidden=8, blocks=1, image_size=(8, 8)), std=0.2), step=1))
    return path


def ids_of(folder):
    return sorted(pads.dataset(str(folder), format="parquet").to_table(columns=["id"]).column("id").to_pylist())


def test_two_live_writers_with_other_rows_per_file_never_double_an_id(checkpoint, ray_cluster, tmp_path):
    """Two generate.py runs at once into one output, one with --rows-per-file 50, one with 30: the second
    is refused while the first writes (the lease), or, started after it, writes the output's own layout."""
    out = tmp_path / "out"
    jobs = [subprocess.Popen([PYTHON, "jobs/generate.py", "--checkpoint", str(checkpoint), "--num-samples", "400",
                              "--rows-per-file", str(rows), "--output", str(out)], cwd=REPO, env=ray_cluster.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rows in (50, 30)]
    results = [(job.wait(timeout=300), *job.communicate()) for job in jobs]
    for code, _, err in results:
        if code:
            line = [x for x in err.splitlines() if x.strip()][-1]
            assert code == 2 and ("is writing" in line or "claimed just now" in line), err[-2000:]
    assert any(code == 0 for code, _, _ in results)
    run_job("generate.py", "--checkpoint", checkpoint, "--num-samples", 400, "--rows-per-file", 30, "--output", out,
            env=ray_cluster.env)
    assert ids_of(out) == list(range(400))  # every id once: no file overlaps another
    layout = json.loads((out / "_manifest.json").read_text())["rows_per_file"]
    assert all((int(p.name[5:17]) % layout == 0) for p in out.glob("part-*.parquet"))


def test_a_lost_s3_endpoint_is_named_in_one_line(checkpoint, ray_cluster, tmp_path):
    """The S3 server goes away mid-run: the line names the failing operation and the endpoint, in both jobs.
    An S3 server of its own, named by --s3-endpoint (the session's cluster has the same fake credentials); the
    two jobs share the cluster's 4 CPUs."""
    import boto3

    server, aws, folder = start_seaweedfs()
    endpoint = aws["AWS_ENDPOINT_URL"]
    env = ray_cluster.env
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="lost")
        jobs = {
            "generate": [PYTHON, "jobs/generate.py", "--checkpoint", checkpoint, "--num-samples", 3000,
                         "--sampler", "naive",  # slow on purpose: still mid-run when the train job first checkpoints
                         "--rows-per-file", 20, "--num-actors", 1, "--cpus-per-actor", 1, "--output", "s3://lost/samples",
                         "--s3-endpoint", endpoint],
            "train": [PYTHON, "jobs/train.py", *map(str, SMALL), "--epochs", 40, "--checkpoint-every", 2,
                      "--cpus-per-worker", 1,
                      "--max-failures", 0,  # the first failure is the run's: no restart that meets it again
                      "--storage", "s3://lost/runs", "--s3-endpoint", endpoint],
        }
        logs = {name: tmp_path / f"{name}.err" for name in jobs}  # files: a full pipe would stall a job
        procs = {name: subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                        stderr=open(logs[name], "w")) for name, cmd in jobs.items()}
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")

        def keys() -> list[str]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket="lost")
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        def writing(found) -> bool:  # a part file and a checkpoint: both jobs are past their start, mid-run
            return any("/part-" in k for k in found) and any("/checkpoint_" in k for k in found)

        deadline = time.time() + 240
        while not writing(found := keys()):
            assert time.time() < deadline and all(p.poll() is None for p in procs.values()), \
                (found[:20], {name: logs[name].read_text()[-1500:] for name in jobs})
            time.sleep(0.5)
        assert all(p.poll() is None for p in procs.values()), "a job ended before the endpoint went away"
        stop_processes([server.pid], grace=0)
        for name, proc in procs.items():
            proc.wait(timeout=300)
            err = logs[name].read_text()
            line = [x for x in err.splitlines() if x.strip()][-1]
            assert proc.returncode == 2 and line.startswith("error:"), f"{name}: {err[-3000:]}"
            assert endpoint in line and ("connect" in line.lower() or "network" in line.lower()), f"{name}: {line}"
            assert "To change retry attempts" not in line
    finally:
        stop_processes([server.pid], grace=0)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_subset_larger_than_the_dataset_is_refused(ray_cluster, tmp_path):
    proc = run_main("train.py", *SMALL[:4], "--subset", 99999999, "--storage", tmp_path, env=ray_cluster.env)
    assert "--subset 99999999 is more than the 60000 training images of mnist" in one_error_line(proc)
    assert not any(tmp_path.iterdir())


def test_an_output_folder_of_other_files_is_refused(checkpoint, ray_cluster, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    (out / "data.parquet").write_bytes(b"PAR1")
    proc = run_main("generate.py", "--checkpoint", checkpoint, "--num-samples", 10, "--output", out, env=ray_cluster.env)
    assert "holds files that are not this job's (data.parquet, notes.txt)" in one_error_line(proc)
    assert sorted(p.name for p in out.iterdir()) == ["data.parquet", "notes.txt"]


# Runs a command and writes its peak memory (KiB) to a file. The job is started from this small process, since a
# child's peak memory starts at its parent's when it is spawned: started from the test process, it would read
# the test process's own peak (2 GB late in a run), however little the job used.
PEAK_RSS = ("import os, subprocess, sys; job = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(job.pid, 0); "
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))")


def test_a_request_too_large_to_plan_is_refused_at_once(checkpoint, local_ray_env, tmp_path):
    started = time.perf_counter()
    args = ["--checkpoint", checkpoint, "--num-samples", 10**10, "--output", tmp_path / "out"]
    proc = subprocess.run([PYTHON, "-c", PEAK_RSS, tmp_path / "peak", PYTHON, "jobs/generate.py", *map(str, args)],
                          cwd=REPO, env=local_ray_env, capture_output=True, text=True)
    assert "10000000000 ids at 10000 per file make 1000000 part files" in one_error_line(proc)
    assert time.perf_counter() - started < 60 and not (tmp_path / "out").exists()
    assert int((tmp_path / "peak").read_text()) < 1_000_000  # KiB: no 10 GB mask (the job takes 0.3 GB)
