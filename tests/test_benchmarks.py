"""The benchmark scripts run: each in its cheapest configuration, its printed figures read back.

The figures themselves are not judged here (speed belongs to the benchmarks); what is checked is that
the commands the README gives still work against the library as it is now.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402  (its parsers read these scripts' real output below, as on a GPU)


def run_benchmark(script: str, *args: str, env: dict | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_sampling_benchmark_times_cached_and_naive(tmp_path):
    out = tmp_path / "rows.json"
    run_benchmark("sampling.py", "--models", "mid", "--batches", "1", "--naive-steps", "1", "--verify-naive", "0",
                  "--json", str(out))
    rows = json.loads(out.read_text())
    ops = [r["ops_per_pixel_step"] for r in rows if "ops_per_pixel_step" in r]
    assert len(ops) == 1 and 10 < ops[0] < 200
    timed = {(r["method"], r["how"]): r for r in rows if "samples_per_s" in r}
    assert set(timed) == {("cached", "full run"), ("naive", "1 passes x 784")}
    for row in timed.values():
        assert row["samples_per_s"] > 0 and row["peak_mb"] > 0 and row["batch"] == 1
    raw = [{**r, "run": 0} for r in rows]
    [fast] = gpu_check.sampling_rows("s", raw, ["cached"], [1], {"cached": "cached"})
    assert fast.status == gpu_check.PASS and fast.numbers["ratio_to_naive"] > 1
    assert [r.name for r in gpu_check.naive_rows("s", raw, [1])] == ["cached sampler ops per pixel step (mid)", "naive, batch 1"]


@pytest.mark.slow
def test_training_benchmark_compares_one_and_two_workers():
    out = run_benchmark("train_throughput.py", "--hidden", "8", "--blocks", "1", "--batch", "4", "--steps", "1",
                        "--no-compile")
    rates = [line for line in out.splitlines() if "images/s per worker" in line]
    assert [line.split("  ")[0].strip() for line in rates] == ["eager fp32, 1 worker", "eager fp32, 2 workers"]
    assert all(float(line.split("images/s")[0].split()[-1]) > 0 for line in rates)
    rows = gpu_check.throughput_rows(out)
    assert [r.name for r in rows] == ["training step, eager fp32, 1 worker", "training step, eager fp32, 2 workers"]


@pytest.mark.slow
def test_generation_benchmark_runs_the_job_beside_the_bare_loop(ray_cluster):
    out = run_benchmark("generation.py", "--hidden", "8", "--blocks", "1", "--num-samples", "64", "--batch-size", "32",
                        "--rows-per-file", "32", "--num-actors", "1", env=ray_cluster.env)
    figures = {line.split(":")[0]: line.split(":")[1].split()[0] for line in out.splitlines() if ":" in line}
    bare, whole, ratio = (float(figures[k]) for k in ("bare sampler loop", "whole job", "ratio job / bare"))
    assert bare > 0 and whole > 0 and ratio == pytest.approx(whole / bare, abs=0.01)
    assert gpu_check.parse_figures(out)["whole job"] == whole


@pytest.mark.slow
def test_generation_benchmark_measures_the_encode_rate():
    out = run_benchmark("generation.py", "--encode-only", "--hidden", "8", "--blocks", "1", "--batch-size", "32",
                        "--encode-batch", "64", "--gpu-rate", "6000")
    rates = [line for line in out.splitlines() if line.startswith("encode rate (")]
    shares = [line for line in out.splitlines() if line.startswith("encoding in the actor at 6,000 samples/s")]
    assert len(rates) == len(shares) >= 1
    for rate, share in zip(rates, shares):
        per_core = float(rate.split(": ")[1].split()[0].replace(",", ""))
        percent = float(share.split(": ")[1].split("%")[0])
        assert per_core > 0 and percent == pytest.approx(100 * 6000 / (6000 + per_core), abs=1)
    assert len(gpu_check.encode_rows(out)) == len(rates)


@pytest.mark.slow
def test_ingest_benchmark_decodes_delivers_and_trains(ray_cluster, tmp_path):
    """Every source decoded and delivered; one training job (the folder, held in memory: its own in-process
    Ray, as the benchmark measures a job's whole process tree)."""
    out = tmp_path / "rows.json"
    text = run_benchmark("ingest.py", "--images", "256", "--decode-images", "32", "--steps", "3", "--log-every", "1",
                         "--no-streamed", "--train-sources", "folder", "--json", str(out), env=ray_cluster.env)
    rows = json.loads(out.read_text())
    got = {(r["measure"], r["source"], r.get("path")) for r in rows}
    own = ("folder", "s3", "parquet")
    assert got == ({("decode", s, None) for s in ("memory", *own)} | {("scan", s, None) for s in own}
                   | {("deliver", s, p) for s in own for p in ("in memory", "streamed")} | {("deliver", "memory", "in memory")}
                   | {("train", "folder", "in memory")})
    for r in rows:
        assert r["images_per_s"] > 0 and (r["measure"] == "train" or r["images"] > 0)
    # the training split (~95% of the 256 images by the hashed split) is what a worker gets
    assert all(200 < r["images"] < 256 for r in rows if r["measure"] == "deliver" and r["path"] == "in memory"
               and r["source"] != "memory")
    train = [r for r in rows if r["measure"] == "train"]
    assert [(r["source"], r["path"], r["first_step"], r["last_step"]) for r in train] == [("folder", "in memory", 1, 3)]
    assert train[0]["images_per_s"] > 0 and train[0]["metric_images_per_s"] > 0 and train[0]["job_s"] > 0
    assert "train folder (in memory):" in text


@pytest.mark.slow
def test_scoring_benchmark_runs_the_job_beside_the_bare_forward_pass(ray_cluster, tmp_path):
    out = tmp_path / "figures.json"
    text = run_benchmark("scoring.py", "--source", "folder", "--num-images", "64", "--batch-size", "32",
                         "--rows-per-file", "32", "--num-actors", "1", "--hidden", "8", "--blocks", "1",
                         "--json", str(out), env=ray_cluster.env)
    figures = json.loads(out.read_text())
    assert figures["images"] == 64 and figures["bare_images_per_s"] > 0 and figures["job_images_per_s"] > 0
    assert figures["ratio_job_pipeline"] == pytest.approx(figures["job_images_per_s"] / figures["bare_images_per_s"])
    assert figures["job_wall_images_per_s"] < figures["job_images_per_s"]  # the wall clock holds the pipeline and more
    lines = {line.split(":")[0] for line in text.splitlines() if ":" in line}
    assert {"bare forward pass", "whole job", "ratio job / bare", "ratio job wall clock / bare"} <= lines


@pytest.mark.slow
def test_quality_benchmark_trains_each_family_beside_the_textbook_baseline(mnist_root, tmp_path):
    """benchmarks/quality.py's cheapest run: every family and the baseline train a step or two through the
    library's loop, are scored on a few test images, and the curves are drawn."""
    import quality
    from PIL import Image

    plot = tmp_path / "quality.png"
    rows = quality.main(["--data-dir", str(mnist_root), "--budget", "0.2", "--hidden", "8", "--filters", "8", "--layers", "2",
                         "--blocks", "1", "--test-subset", "8", "--points", "1", "--plot", str(plot)])
    assert [r["model"] for r in rows] == ["textbook", "pixelcnn", "gated", "pixelcnnpp"]
    for r in rows:
        assert r["steps"] >= 1 and 0 < r["train_s"] <= r["wall_s"] and 0 < r["test_bits_per_dim"] < 9, r
        assert r["curve"] and r["curve"][-1] == (r["train_s"], r["test_bits_per_dim"]), r
        assert r["vs_textbook"] == pytest.approx(1 - r["test_bits_per_dim"] / rows[0]["test_bits_per_dim"], abs=1e-4)
    assert Image.open(plot).size == (640, 400)
