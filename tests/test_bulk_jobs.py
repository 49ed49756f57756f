"""The bulk jobs (generate.py, score.py) before and after their pipeline: layouts no run could finish are
refused before Ray starts, with advice that works; an output of the other job is named as such; the
summary parts start-up from the pipeline's rate (and, in a real run of each job, tests/test_generate_job.py
and tests/test_score_job.py)."""

import json
import re
import subprocess
import sys
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, one_error_line, run_main
from jobs import generate, outputs, score
from jobs.errors import JobError
from jobs.schema import SAMPLE_SCHEMA, sample_table
from jobs.storage import open_storage
from pixelcnn import PixelCNN
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint



def mnist_row() -> int:
    """The bytes a generated 28x28 grayscale row may take in a shard."""
    return generate.shard_row_bytes((1, 28, 28), "/runs/make-train/model.pt")


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\b\d+\b", text)]


def test_shards_larger_than_an_actor_holds_are_refused_naming_the_largest_that_fits():
    row_bytes = mnist_row()
    with pytest.raises(JobError, match=r"^--rows-per-file 100000000 makes shards of \d+\.\d GiB .*: use --rows-per-file "
                                       r"(\d+) or less$") as info:
        outputs.check_rows_per_file(10**8, row_bytes)
    most = numbers(str(info.value))[-1]
    outputs.check_rows_per_file(most, row_bytes)  # the advice is taken ...
    assert most * row_bytes <= outputs.SHARD_BYTES < (most + 1) * row_bytes  # ... and is the largest shard that fits
    assert row_bytes >= 2 * 28 * 28  # the raw image and its PNG at least


def test_too_many_files_names_a_rows_per_file_within_the_bound_or_says_to_split():
    row_bytes = mnist_row()
    with pytest.raises(JobError, match="10000000000 ids at 10000 per file make 1000000 part files, more than the 100000 "
                                       r"one output takes: raise --rows-per-file to between 100000 and \d+$") as info:
        outputs.check_files(10**10, 10_000, row_bytes)
    low, high = numbers(str(info.value))[-2:]
    for rows in (low, high):  # either end of the advice makes a run that fits both bounds
        outputs.check_files(10**10, rows, row_bytes)
        outputs.check_rows_per_file(rows, row_bytes)
    with pytest.raises(JobError, match=r"no --rows-per-file takes it \(above (\d+), shards exceed 1 GiB\): split the "
                                       r"request into outputs of at most (\d+) --num-samples each, each with its own "
                                       r"--seed$") as info:
        outputs.check_files(10**12, 10_000, row_bytes, generate.SPLIT)
    most, ids = map(int, re.search(r"above (\d+),.* at most (\d+) ", str(info.value)).groups())
    outputs.check_files(ids, most, row_bytes)
    outputs.check_rows_per_file(most, row_bytes)
    with pytest.raises(JobError):
        outputs.check_files(ids + 1, most, row_bytes)
    assert "split the images into sets of at most" in str(pytest.raises(
        JobError, outputs.check_files, 10**12, 10_000, score.shard_row_bytes((1, 28, 28), True, ""), score.SPLIT).value)


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model" / "model.pt"
    save_checkpoint(path, checkpoint_dict(PixelCNN(hidden=8, blocks=1, image_size=(6, 6)), step=1, dataset="test"))
    return path


@pytest.fixture
def no_ray(monkeypatch):
    def started(*_, **__):
        raise AssertionError("Ray started")

    monkeypatch.setattr(generate, "init_ray", started)
    monkeypatch.setattr(score, "init_ray", started)


def test_generate_refuses_a_layout_no_run_finishes_before_ray_starts_and_its_advice_is_taken(model, no_ray, tmp_path):
    """Each refusal comes before Ray starts and writes nothing; the request its advice gives passes every
    check up to Ray's start (where ``no_ray`` stops it)."""
    out = tmp_path / "out"

    def generate_(*args):
        return run_main("generate.py", "--checkpoint", model, "--output", out, *args)

    line = one_error_line(generate_("--num-samples", 10**12))
    most, ids = map(int, re.search(r"no --rows-per-file takes it \(above (\d+),.*: split the request into outputs of "
                                   r"at most (\d+) --num-samples each, each with its own --seed$", line).groups())
    assert one_error_line(generate_("--num-samples", ids, "--rows-per-file", most)) == \
        "error: generation failed: Ray started (PIXELCNN_DEBUG=1 shows the traceback)"
    line = one_error_line(generate_("--num-samples", 10**12, "--rows-per-file", 10**8))
    assert re.search(rf"--rows-per-file 100000000 makes shards of .*: use --rows-per-file {most} or less$", line)
    line = one_error_line(generate_("--num-samples", 10**10))
    low, high = map(int, re.search(r"raise --rows-per-file to between (\d+) and (\d+)$", line).groups())
    assert high == most
    for rows in (low, high):
        assert "Ray started" in one_error_line(generate_("--num-samples", 10**10, "--rows-per-file", rows))
    assert not out.exists()


def test_score_refuses_shards_larger_than_an_actor_holds_before_ray_starts(model, no_ray, tmp_path):
    proc = run_main("score.py", "--checkpoint", model, "--dataset", tmp_path, "--output", tmp_path / "out",
                    "--per-pixel", "--rows-per-file", 10**8)
    assert "use --rows-per-file" in one_error_line(proc)
    assert not (tmp_path / "out").exists()


def manifests(model_file: str) -> dict:
    return {
        "generation": asdict(generate.Manifest(checkpoint=model_file, model_sha256="ab", seed=0, temperature=1.0,
                                               label_probs=None, dtype="float32", sampler="cached")),
        "scoring": asdict(score.Manifest(checkpoint=model_file, dataset="mnist", model_sha256="ab", data_fingerprint="f",
                                         split="all", test_fraction=None, image_size=None, channels=None, labels="none",
                                         label_probs=None, per_pixel=False, dtype="float32")),
    }


@pytest.mark.parametrize("kind", ["generation", "scoring"])
@pytest.mark.parametrize("recorded", [True, False])  # False: a manifest from before its kind was recorded
def test_an_output_of_the_other_job_is_refused_as_such(kind, recorded, model, no_ray, tmp_path):
    out = tmp_path / "out"
    stored = manifests(str(model))[kind]
    if not recorded:
        del stored["kind"]
    out.mkdir()
    (out / outputs.MANIFEST).write_text(json.dumps(stored))
    before = sorted(p.name for p in out.iterdir())
    if kind == "generation":
        proc = run_main("score.py", "--checkpoint", model, "--dataset", tmp_path, "--output", out)
    else:
        proc = run_main("generate.py", "--checkpoint", model, "--num-samples", 4, "--output", out)
    other = "scoring" if kind == "generation" else "generation"
    assert one_error_line(proc) == f"error: {out} is a {kind} output, not a {other} one: use another --output"
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_sink_hands_back_when_the_first_shard_reached_an_actor(tmp_path):
    output = open_storage(str(tmp_path), None)
    output.write(outputs.MANIFEST, b"{}")
    sink = outputs.make_sink(output, SAMPLE_SCHEMA)
    table = sample_table(range(3), torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(3), None, seed=0,
                         temperature=1.0, sampler="cached", dtype="float32", checkpoint="c", model_sha256="ab")
    result = sink.write([table.append_column(outputs.STARTED, pa.array([7.0, 5.0, 6.0]))], None)
    assert result == {"rows": 3, "started": 5.0}
    (part,) = tmp_path.glob("part-*.parquet")
    assert pq.read_schema(part).names == SAMPLE_SCHEMA.names  # the time stamp is not written
    sink.on_write_complete(type("WriteResult", (), {"write_returns": [result, {"rows": 0, "started": None},
                                                                      {"rows": 2, "started": 9.0}]}))
    assert sink.started == 5.0


def test_the_summary_parts_start_up_from_the_pipeline():
    times = outputs.timings(12, 100.0, 104.9, 105.4)
    assert times == {"seconds": 5.4, "per_s": 2.22, "startup_seconds": 4.9, "pipeline_seconds": 0.5, "pipeline_per_s": 24.0}
    assert outputs.timing_text(times, "images") == "5.4 s: 4.9 s start-up, 0.5 s pipeline (24.0 images/s)"
    assert outputs.timings(12, 100.0, 99.0, 105.4)["startup_seconds"] == 0.0  # another node's clock: kept in the span
    nothing = outputs.timings(0, 100.0, None, 100.2)
    assert nothing["pipeline_per_s"] == 0.0 and outputs.timing_text(nothing, "samples") == "0.2 s"


def test_what_ray_datas_cpu_tasks_run_imports_no_torch():
    """Image decoding, the Parquet rows, the sink and storage run in Ray Data's task workers: without torch in
    their imports a worker starts in ~1.6 CPU-s instead of ~4.2 (docs/development.md)."""
    code = ("import sys, jobs.datasets, jobs.outputs, jobs.schema, jobs.storage, pixelcnn.images; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'torchvision'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout[-2000:] + proc.stderr[-2000:]
