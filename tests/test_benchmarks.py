"""The benchmark scripts run: each in its cheapest configuration, its printed figures read back.

The figures themselves are not judged here (speed belongs to the benchmarks); what is checked is that
the commands the README gives still work against the library as it is now.
"""

import json
import subprocess
import sys

import pytest

from conftest import REPO


def run_benchmark(script: str, *args: str, env: dict | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sampling_benchmark_times_cached_and_naive(tmp_path):
    out = tmp_path / "rows.json"
    run_benchmark("sampling.py", "--models", "mid", "--batches", "1", "--naive-steps", "1", "--verify-naive", "1",
                  "--json", str(out))
    rows = json.loads(out.read_text())
    ops = [r["ops_per_pixel_step"] for r in rows if "ops_per_pixel_step" in r]
    assert len(ops) == 1 and 10 < ops[0] < 200
    timed = {(r["method"], r["how"]): r for r in rows if "samples_per_s" in r}
    assert set(timed) == {("cached", "full run"), ("naive", "1 passes x 784"), ("naive", "full run")}
    for row in timed.values():
        assert row["samples_per_s"] > 0 and row["peak_mb"] > 0 and row["batch"] == 1


def test_training_benchmark_compares_one_and_two_workers():
    out = run_benchmark("train_throughput.py", "--hidden", "8", "--blocks", "1", "--batch", "4", "--steps", "1",
                        "--no-compile")
    rates = [line for line in out.splitlines() if "images/s per worker" in line]
    assert [line.split("  ")[0].strip() for line in rates] == ["eager fp32, 1 worker", "eager fp32, 2 workers"]
    assert all(float(line.split("images/s")[0].split()[-1]) > 0 for line in rates)


@pytest.mark.slow
def test_generation_benchmark_runs_the_job_beside_the_bare_loop(local_ray_env):
    out = run_benchmark("generation.py", "--hidden", "8", "--blocks", "1", "--num-samples", "64", "--batch-size", "32",
                        "--rows-per-file", "32", "--num-actors", "1", env=local_ray_env)
    figures = {line.split(":")[0]: line.split(":")[1].split()[0] for line in out.splitlines() if ":" in line}
    bare, whole, ratio = (float(figures[k]) for k in ("bare sampler loop", "whole job", "ratio job / bare"))
    assert bare > 0 and whole > 0 and ratio == pytest.approx(whole / bare, abs=0.01)
