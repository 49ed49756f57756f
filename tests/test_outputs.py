"""jobs/outputs.py: what makes the bulk jobs' outputs exactly once — the manifest's exclusive claim, the
lease, the plan read from part file names, the refusal of foreign and overlapping files, the sink."""

import json
from dataclasses import replace
import os
import subprocess
import time
import tracemalloc

import numpy as np
import pytest
import torch

from conftest import PYTHON
from jobs import outputs
from jobs.errors import JobError
from jobs.generate import Manifest, upgrade
from jobs.schema import SAMPLE_SCHEMA, sample_table
from jobs.storage import open_storage

BASE = Manifest(checkpoint="c", model_sha256="ab", seed=0, temperature=1.0, label_probs=None, dtype="float32",
                sampler="cached", rows_per_file=10)


def block(first, count, sampler="cached"):
    return sample_table(np.arange(first, first + count), torch.zeros(count, 1, 3, 3, dtype=torch.uint8),
                        torch.zeros(count), None, seed=0, temperature=1.0, sampler=sampler, dtype="float32",
                        checkpoint="c", model_sha256="ab")


def claim(output, manifest=BASE):
    done = outputs.part_ranges(output)
    outputs.claim(output, manifest, has_parts=bool(done), upgrade=upgrade(output, manifest.sampler))


def check(output, manifest=BASE):
    done = outputs.part_ranges(output)
    return outputs.check_manifest(output, manifest, has_parts=bool(done), upgrade=upgrade(output, manifest.sampler))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_two_requests_racing_for_a_fresh_output_one_claims_it(where, s3, tmp_path, monkeypatch):
    """Both found no manifest and went on; the one that claims the output second stops, rather than write
    its images under the other's manifest."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    output = open_storage(str(tmp_path / "out") if where == "local" else f"s3://pixelcnn/race/{tmp_path.name}", None)
    second = replace(BASE, **{"seed": 1})
    check(output)
    check(output, second)  # both see a fresh output
    claim(output)
    with pytest.raises(JobError, match="seed 0 -> 1"):
        claim(output, second)
    assert json.loads(output.read(outputs.MANIFEST))["seed"] == 0
    claim(output)  # the same request again (a rerun) goes on
    assert not output.create(outputs.MANIFEST, b"{}") and json.loads(output.read(outputs.MANIFEST))["seed"] == 0


def test_a_claimed_output_without_rows_says_how_to_free_it(tmp_path):
    output = open_storage(str(tmp_path), None)
    claim(output, replace(BASE, **{"seed": 5}))
    with pytest.raises(JobError, match=r"claimed by another request \(seed 5 -> 6\) that has written no rows yet: "
                                       r"if none is running, delete _manifest.json there"):
        claim(output, replace(BASE, **{"seed": 6}))


def test_an_output_holds_one_samplers_images(tmp_path):
    """The samplers' draws part at CDF ties: a rerun with another sampler is refused, also where the
    manifest predates the sampler's place in it (its part files say which one wrote them)."""
    output = open_storage(str(tmp_path), None)
    old = {"model_sha256": "ab", "seed": 0, "temperature": 1.0, "label_probs": None, "dtype": "float32"}
    output.write(outputs.MANIFEST, json.dumps(old).encode())
    check(output)  # no rows yet: any sampler may start them
    outputs.write_part(output, block(0, 2, "naive"), SAMPLE_SCHEMA)
    naive = replace(BASE, **{"sampler": "naive"})
    check(output, naive)
    with pytest.raises(JobError, match="holds rows of another request \\(sampler 'naive' -> 'cached'\\)"):
        check(output)
    outputs.write_part(output, block(2, 2, "cached"), SAMPLE_SCHEMA)
    with pytest.raises(JobError, match="sampler 'cached\\+naive' -> 'naive'"):  # rows of two samplers: no third
        check(output, naive)
    output.write(outputs.MANIFEST, json.dumps({k: v for k, v in old.items() if k != "dtype"}).encode())
    with pytest.raises(JobError, match="older generate.py"):
        check(output)


def test_the_sink_writes_only_into_the_drivers_local_folder(tmp_path):
    """Ray Data may run a write task on another node: there a local --output is another node's folder."""
    output = open_storage(str(tmp_path / "out"), None)
    with pytest.raises(JobError, match="lacks the driver's _manifest.json: a local --output must be a folder every node shares"):
        outputs.make_sink(output, SAMPLE_SCHEMA).write([block(0, 2)], None)
    assert not (tmp_path / "out").exists()
    output.write(outputs.MANIFEST, b"{}")  # as the driver does before the pipeline starts
    assert outputs.make_sink(output, SAMPLE_SCHEMA).write([block(0, 2)], None) == {"rows": 2, "started": None}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [outputs.MANIFEST, "part-000000000000-000000000001.parquet"]
    with pytest.raises(RuntimeError, match="holds an id twice"):
        outputs.write_part(output, sample_table(np.array([5, 5]), torch.zeros(2, 1, 3, 3, dtype=torch.uint8),
                                                torch.zeros(2), None, seed=0, temperature=1.0, sampler="cached",
                                                dtype="float32", checkpoint="c", model_sha256="ab"), SAMPLE_SCHEMA)


def test_a_manifest_that_cannot_be_written_is_one_error_line(s3, monkeypatch):
    """The manifest's exclusive create goes through boto3, not Arrow: its failure (no credentials) is a
    JobError naming the output, not a traceback. (A fresh output: S3 refuses the listing before it to
    anonymous requests too.)"""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    output = open_storage("s3://pixelcnn/no-credentials", None)
    with pytest.raises(JobError, match="^cannot write to s3://pixelcnn/no-credentials \\(endpoint http://127.0.0.1:\\d+\\): "
                                       "Unable to locate credentials"):
        outputs.claim(output, BASE, has_parts=False)


def test_the_plan_is_read_from_file_names():
    done = [(0, 10, "a"), (20, 25, "b"), (30, 40, "c")]
    assert outputs.plan(45, done, 10) == [(10, 20), (25, 30), (40, 45)]
    assert outputs.plan(25, done, 10) == [(10, 20)]
    assert outputs.plan(8, [], 10) == [(0, 8)]
    assert outputs.plan(40, done, 10) == [(10, 20), (25, 30)]


def test_a_request_too_large_to_plan_is_refused_fast_with_bounded_memory():
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(JobError, match="10000000000 ids at 10000 per file make 1000000 part files, more than the "
                                       "100000 one output takes: raise --rows-per-file"):
        outputs.plan(10**10, [], 10_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - started < 1 and peak < 1_000_000


def test_foreign_files_and_overlapping_parts_are_refused_and_repaired(tmp_path):
    output = open_storage(str(tmp_path), None)
    output.write(outputs.MANIFEST, b"{}")
    for first, count in ((0, 10), (0, 6), (6, 6), (12, 3)):  # two layouts' files over ids 0..14
        outputs.write_part(output, block(first, count), SAMPLE_SCHEMA)
    with pytest.raises(JobError, match="holds part files that overlap \\(part-000000000000-000000000005.parquet and "
                                       "part-000000000000-000000000009.parquet and 1 more pairs\\): rerun with --repair"):
        outputs.check_ours(output, outputs.part_ranges(output))
    kept = outputs.repair(output, outputs.part_ranges(output))
    assert [(a, b) for a, b, _ in kept] == [(0, 10), (12, 15)]
    assert outputs.plan(15, kept, 10) == [(10, 12)]
    outputs.check_ours(output, kept)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data.parquet").write_bytes(b"x")
    with pytest.raises(JobError, match="holds files that are not this job's \\(data.parquet, notes.txt\\): use an "
                                       "empty or new --output"):
        outputs.check_ours(output, kept)


def test_a_live_lease_refuses_a_second_writer_and_a_dead_ones_is_taken_over(tmp_path, monkeypatch):
    output = open_storage(str(tmp_path), None)
    with outputs.Lease(output, "generate.py"):
        held = json.loads(output.read(outputs.LEASE))
        assert held["pid"] == os.getpid()
        with pytest.raises(JobError, match=r"another generate.py is writing .* \(host .*, pid \d+, lease renewed 0 s "
                                           r"ago\): wait for it to finish, or stop it"):
            outputs.Lease(output, "generate.py").__enter__()
    assert output.read(outputs.LEASE) is None  # released
    # A lease left by a job killed with -9 on this host: its process is gone, so it is taken over at once.
    gone = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    output.write(outputs.LEASE, json.dumps({"id": "x", "job": "score.py", "host": os.uname().nodename, "pid": int(gone),
                                            "renewed": time.time()}).encode())
    with outputs.Lease(output, "generate.py") as lease:
        assert json.loads(output.read(outputs.LEASE))["id"] == lease.owner["id"]
    # One from another host that stopped renewing is stale after LEASE_STALE_S.
    output.write(outputs.LEASE, json.dumps({"id": "y", "job": "generate.py", "host": "elsewhere", "pid": 1,
                                            "renewed": time.time() - outputs.LEASE_STALE_S - 1}).encode())
    with outputs.Lease(output, "generate.py"):
        pass
    monkeypatch.setattr(outputs, "LEASE_RENEW_S", 0.05)  # renewed while the job runs
    with outputs.Lease(output, "generate.py"):
        first = json.loads(output.read(outputs.LEASE))["renewed"]
        time.sleep(0.3)
        assert json.loads(output.read(outputs.LEASE))["renewed"] > first
