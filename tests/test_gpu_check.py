"""benchmarks/gpu_check.py, the GPU acceptance run, and benchmarks/ray_for_gpu.py, its trimmed Ray.

A GPU is lent rarely and briefly, so what can be checked without one is checked here: the parsers of
every command's output (on canned GPU outputs), the choices the run makes from them (tiles, the job's
sampler), its failure and deadline handling, the wheel trimming, and, end to end, the dry run (``--device
cpu --quick --dry-run``), which builds every step's command and has its script check the flags.
"""

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import ray_for_gpu  # noqa: E402
from gpu_check import FAIL, PASS, SKIP, Row  # noqa: E402


def check(tmp_path, *args):
    c = gpu_check.Check(gpu_check.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path / "out"),
                                              "--work", str(tmp_path / "work"), *args]))
    shutil.rmtree(c.env["RAY_TMPDIR"])  # these tests start no Ray
    return c


def test_error_line_names_the_exception_not_the_traceback():
    out = "step 10\nTraceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: CUDA error: out of memory\n"
    assert gpu_check.error_line(out) == "RuntimeError: CUDA error: out of memory"
    ray = "\x1b[36m(RayTrainWorker pid=12, ip=10.0.0.1)\x1b[0m torch.OutOfMemoryError: CUDA out of memory\nbye\n"
    assert gpu_check.error_line(ray) == "torch.OutOfMemoryError: CUDA out of memory"
    assert gpu_check.error_line("a\nerror: --num-samples must be positive\n") == "error: --num-samples must be positive"
    assert gpu_check.error_line("ok\nsomething failed here\nlast\n") == "something failed here"
    assert gpu_check.error_line("") == "no output"


def test_junit_report_gives_a_row_per_test_id(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text("""<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.test_gated" name="test_cuda_graph_replays_draw_the_cpu_images[case0]" time="3.5"/>
<testcase classname="tests.test_fused" name="test_compiled_kernel_on_cuda_draws_the_cpu_images" time="20.1">
  <failure message="AssertionError: 7&#10;more">trace</failure></testcase>
<testcase classname="tests.test_gated" name="test_x" time="0"><skipped message="CUDA graphs need a CUDA device"/></testcase>
</testsuite></testsuites>""")
    rows = gpu_check.junit_rows(str(report))
    assert [(r.name, r.status, r.detail) for r in rows] == [
        ("tests/test_gated.py::test_cuda_graph_replays_draw_the_cpu_images[case0]", PASS, ""),
        ("tests/test_fused.py::test_compiled_kernel_on_cuda_draws_the_cpu_images", FAIL, "AssertionError: 7"),
        ("tests/test_gated.py::test_x", SKIP, "CUDA graphs need a CUDA device"),
    ]
    assert rows[0].figure == "3.5 s"


# sampling.py --json rows as a GPU run writes them (two runs: the second a retry of one method)
SAMPLING_ROWS = [
    {"model": "reference", "ops_per_pixel_step": 127.0, "run": 0},
    {"model": "reference", "method": "cached", "batch": 256, "samples_per_s": 466.6, "peak_mb": 455, "how": "full run", "run": 0},
    {"model": "reference", "method": "naive", "batch": 256, "samples_per_s": 14.0, "peak_mb": 1046, "how": "3 passes x 784", "run": 0},
    {"model": "reference", "method": "bf16", "batch": 256, "samples_per_s": 727.2, "peak_mb": 400, "how": "full run",
     "bf16_log_prob_error_bits_per_dim": 8e-6, "run": 1},
    {"model": "reference", "method": "naive", "batch": 256, "samples_per_s": 7.0, "peak_mb": 1046, "how": "3 passes x 784", "run": 1},
]


def test_sampling_rows_take_each_ratio_to_its_own_runs_naive_rate():
    rows = gpu_check.sampling_rows("s", SAMPLING_ROWS, ["cached", "bf16"], [256, 1024], gpu_check.LABELS, targets=True)
    by_name = {r.name: r for r in rows}
    cached, bf16 = by_name["cached+graph float32, batch 256"], by_name["cached+graph bf16, batch 256"]
    assert cached.status == PASS and cached.numbers["ratio_to_naive"] == pytest.approx(466.6 / 14.0)
    assert bf16.numbers["ratio_to_naive"] == pytest.approx(727.2 / 7.0)  # run 1's naive rate
    assert "500x target not met" in cached.detail and "log-prob" in bf16.detail
    assert by_name["cached+graph float32, batch 1024"].status == FAIL  # no figure for it
    naive = gpu_check.naive_rows("s", SAMPLING_ROWS, [256])
    assert [r.name for r in naive] == ["cached sampler ops per pixel step (reference)", "naive, batch 256"]
    # a TF32 run's rows must say they were measured in TF32
    tf32 = gpu_check.sampling_rows("t", [{**SAMPLING_ROWS[1], "fp32_precision": "ieee"}, SAMPLING_ROWS[2]], ["cached"],
                                   [256], {"cached": "x"}, tf32=True)
    assert tf32[0].status == FAIL and "not tf32" in tf32[0].detail


def test_tile_sweep_picks_the_fastest_valid_tiles_per_dtype():
    raw = [
        {"method": "fused", "batch": 4096, "samples_per_s": 3000.0, "peak_mb": 1, "run": 0},
        {"method": "fused", "batch": 4096, "tiles": "64x64x4", "samples_per_s": 3300.0, "peak_mb": 1, "run": 0},
        {"method": "fused", "batch": 4096, "tiles": "128x128x8x2", "error": "OutOfResources: shared memory", "run": 0},
        {"method": "fused-bf16", "batch": 4096, "samples_per_s": 9000.0, "peak_mb": 1, "run": 0},
        {"method": "fused-bf16", "batch": 4096, "tiles": "64x128x4", "samples_per_s": 8000.0, "peak_mb": 1, "run": 0},
    ]
    rows = {r.name: r for r in gpu_check.tile_rows("tiles", raw, ["fused", "fused-bf16"], gpu_check.LABELS, 4096)}
    default = gpu_check.fused_default_tiles()
    assert rows["fused float32, tiles 128x128x8x2, batch 4096"].status == FAIL
    best32, best16 = rows["fastest tiles, fused float32"], rows["fastest tiles, fused bf16"]
    assert best32.numbers["knobs"] == {"BLOCK_K": 64, "BLOCK_N": 64, "NUM_WARPS": 4} and "+10%" in best32.figure
    assert best16.numbers["tiles"] == default and "+0%" in best16.figure


def test_default_tiles_are_read_from_fused_py():
    import pixelcnn.sampling.fused as fused

    assert gpu_check.fused_default_tiles() == "x".join(str(getattr(fused, k)) for k in gpu_check.TILE_KNOBS)


def test_job_sampler_is_the_fastest_that_passed_its_checks(tmp_path):
    c = check(tmp_path)
    c.gpu, c.quick = True, False  # the GPU run's batches (256, 1024, 4096)

    def figure(step, method, batch, rate):
        return Row(step, f"{gpu_check.LABELS[method]}, batch {batch}", PASS, "",
                   numbers={"method": method, "batch": batch, "samples_per_s": rate})

    c.rows = [figure("sampling-cached", "cached", 4096, 3200), figure("sampling-cached", "bf16", 4096, 5900),
              figure("sampling-cached", "bf16", 256, 9e9), figure("sampling-fused", "fused-bf16", 4096, 12000),
              Row("cuda-tests", "tests/test_fused.py::test_compiled_kernel_on_cuda_draws_the_cpu_images", FAIL)]
    assert gpu_check.pick_job_sampler(c)[:2] == ("cached", "bfloat16")  # the fused kernel failed its test
    c.rows[-1].status = PASS
    assert gpu_check.pick_job_sampler(c)[:2] == ("fused", "bfloat16")
    c.rows = []
    assert gpu_check.pick_job_sampler(c)[:2] == ("cached", "float32")


def test_output_parsers_read_the_gpu_lines():
    out = """eager fp32, 1 worker                    4263.00 images/s per worker   68200.0 GFLOP/s per worker  MFU 6.9% of bf16 peak
bf16+channels_last+compile, 1 worker   10782.00 images/s per worker  172500.0 GFLOP/s per worker  MFU 17.5% of bf16 peak
ratio eager fp32, 1 worker               / eager 1 worker: 1.00x per worker
"""
    rows = gpu_check.throughput_rows(out)
    assert [r.name for r in rows] == ["training step, eager fp32, 1 worker", "training step, bf16+channels_last+compile, 1 worker"]
    assert rows[1].numbers["mfu_percent"] == 17.5 and rows[1].detail == "2.53x eager fp32"
    with pytest.raises(gpu_check.StepFailed):
        gpu_check.throughput_rows("nothing\n")
    figures = gpu_check.parse_figures("bare sampler loop: 649.0 samples/s (2 threads, cpu, cached, float32)\n"
                                      "whole job:         659.7 samples/s (2 actors, 62.0 s incl. Ray start-up)\n"
                                      "ratio job / bare:  1.02\n")
    assert figures == {"bare sampler loop": 649.0, "whole job": 659.7, "ratio job / bare": 1.02}
    encode = gpu_check.encode_rows("encode rate (samples): 11,600 rows/s per core (median of 3: 11,000; 4096 rows 1x28x28)\n"
                                   "encoding in the actor at 6,000 samples/s (samples): 34% of its time\n")
    assert [(r.name, r.figure, r.numbers["rows_per_s_per_core"]) for r in encode] == [
        ("PNG + Arrow encode rate (samples)", "11,600 rows/s per core", 11600.0)]


def test_mnist_gz_files_are_unpacked_for_torchvision(tmp_path):
    raw = tmp_path / "carried" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in gpu_check.MNIST_FILES:
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(name.encode())
    c = check(tmp_path, "--mnist", f"{tmp_path / 'nowhere'},{tmp_path / 'carried'}")
    root, source = gpu_check.mnist_root(c)
    assert source == str(tmp_path / "carried")
    assert sorted(os.listdir(os.path.join(root, "MNIST", "raw"))) == sorted(gpu_check.MNIST_FILES)
    assert open(os.path.join(root, "MNIST", "raw", gpu_check.MNIST_FILES[0]), "rb").read() == gpu_check.MNIST_FILES[0].encode()
    assert gpu_check.mnist_root(check(tmp_path, "--mnist", str(tmp_path / "nowhere"))) == (None, None)


def test_plain_mnist_files_are_read_where_they_are(tmp_path):
    """A torchvision root as ../shared has it (MNIST/raw, plain files beside the .gz): its own folder."""
    raw = tmp_path / "shared" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in gpu_check.MNIST_FILES:
        (raw / name).write_bytes(name.encode())
        (raw / f"{name}.gz").write_bytes(b"")
    root, source = gpu_check.mnist_root(check(tmp_path, "--mnist", str(tmp_path / "shared" / "mnist")))
    assert (root, source) == (str(tmp_path / "shared" / "mnist"), str(tmp_path / "shared" / "mnist"))


def test_a_failing_or_hanging_step_is_a_row_and_the_deadline_skips_the_rest(tmp_path):
    c = check(tmp_path)

    def hangs(c, timeout):
        return c.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], timeout)

    def raises(c, timeout):
        raise KeyError("oops")

    start = time.monotonic()
    rows = gpu_check.run_step(c, gpu_check.Step("hang", "hangs", hangs, 1, 1), {"hang"})
    assert time.monotonic() - start < 20
    assert rows[0].status == FAIL and rows[0].detail.startswith("timed out after 1 s (last line: started)")
    rows = gpu_check.run_step(c, gpu_check.Step("boom", "raises", raises, 5, 5), {"boom"})
    assert rows[0].status == FAIL and rows[0].detail == "KeyError: 'oops'"
    rows = gpu_check.run_step(c, gpu_check.Step("gpu", "needs cuda", raises, 5, 5, True), {"gpu"})
    assert rows[0].status == SKIP and "needs CUDA" in rows[0].detail
    c.deadline = time.monotonic()
    rows = gpu_check.run_step(c, gpu_check.Step("late", "late", raises, 5, 5), {"late"})
    assert rows[0].status == SKIP and "global deadline" in rows[0].detail
    assert "$ " in (tmp_path / "out" / "gpu_check.log").read_text()


def test_summary_and_rerun_line(tmp_path, monkeypatch):
    c = check(tmp_path)

    def figure(step, label, batch, rate):
        return Row(step, f"{label}, batch {batch}", PASS, "", numbers={"method": "cached", "batch": batch, "samples_per_s": rate})

    c.rows = [figure("sampling-cached", "cached float32", 1, 2.0), figure("sampling-tf32", "cached float32, TF32 x", 1, 3.0),
              Row("generation", "job", FAIL, detail="boom"), Row("tiles", "t", SKIP, detail="needs CUDA (--device cpu)"),
              Row("train-throughput", "t", SKIP, detail="global deadline: --budget-s 480 spent")]
    assert gpu_check.summary(c) == ["samples/s by batch, cached float32: 1: 2",
                                    "samples/s by batch, cached float32, TF32 x: 1: 3"]
    monkeypatch.setattr(sys, "argv", ["benchmarks/gpu_check.py", "--out", "/o", "--only", "generation", "--budget-s", "99"])
    assert gpu_check.rerun(c).endswith("benchmarks/gpu_check.py --out /o --budget-s 99 --only generation,train-throughput")


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def test_trimmed_wheel_drops_jars_and_web_client_and_keeps_record_true(tmp_path):
    files = {"ray/__init__.py": b"x = 1\n", "ray/jars/ray_dist.jar": b"java" * 100,
             "ray/dashboard/client/build/index.html": b"<html>", "ray/dashboard/head.py": b"pass\n",
             "ray/thirdparty_files/x-1.0.dist-info/RECORD": b"x/__init__.py,,\n"}
    record = "ray-2.60.0.dist-info/RECORD"
    src = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(src, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(record, "\n".join([record_line(n, d) for n, d in files.items()] + [f"{record},,"]) + "\n")
    dest = tmp_path / "trimmed.whl"
    assert ray_for_gpu.trim_wheel(str(src), str(dest)) == (2, 4)
    ray_for_gpu.check_wheel(str(dest))
    with zipfile.ZipFile(dest) as z:
        assert sorted(z.namelist()) == sorted(["ray/__init__.py", "ray/dashboard/head.py", record,
                                               "ray/thirdparty_files/x-1.0.dist-info/RECORD"])
        assert "jars" not in z.read(record).decode()
    with pytest.raises(SystemExit, match="RECORD and files differ"):
        ray_for_gpu.check_wheel(str(_without(src, tmp_path)))


def _without(src, tmp_path):
    """A copy of wheel ``src`` missing a file its RECORD lists (what pip would refuse)."""
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if info.filename != "ray/jars/ray_dist.jar":
                zout.writestr(info, zin.read(info))
    return bad


def test_every_flag_and_step_is_in_the_doc():
    doc = (REPO / "docs" / "gpu.md").read_text()
    help_text = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--help"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}
    assert len(flags) > 10 and not sorted(f for f in flags if f not in doc)
    assert not [s.name for s in gpu_check.STEPS if f"`{s.name}`" not in doc]


@pytest.mark.slow
def test_the_dry_run_builds_every_step_and_its_flags_are_accepted(tmp_path):
    """The whole command on a CPU with --dry-run, as a GPU session would start it: every step that needs no
    CUDA builds its command and the script's own parser takes its flags (the scripts themselves run in
    tests/test_benchmarks.py, their outputs read by these parsers), each CUDA step is SKIPPED saying so,
    and both tables are written."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--dry-run",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    markdown = (out / "gpu_check.md").read_text()
    rows = {row["step"]: row for row in report["rows"]}
    assert set(rows) == {s.name for s in gpu_check.STEPS}
    for step in gpu_check.STEPS:
        row = rows[step.name]
        assert row["name"] in markdown
        if step.needs_cuda:
            assert row["status"] == SKIP and "needs CUDA" in row["detail"], row
        elif step.name == "ray":  # a probe: run for real
            assert row["status"] == PASS and row["figure"].startswith("ray "), row
        else:
            assert row["status"] == SKIP and row["detail"].startswith("dry run: "), row
    commands = re.findall(r"^\$ (.*)$", (out / "gpu_check.log").read_text(), re.M)
    built = " | ".join(commands)
    for script in ("benchmarks/sampling.py", "jobs/train.py", "benchmarks/generation.py", "benchmarks/train_throughput.py"):
        assert script in built, built
    train = next(c for c in commands if "jobs/train.py" in c)
    assert "--max-steps 20" in train and "--num-workers 1" in train and "--use-gpu" not in train
    assert report["machine"]["torch"] and report["machine"]["ray"]


def test_the_dry_run_refuses_flags_a_script_does_not_take():
    with pytest.raises(gpu_check.StepFailed, match="sampling.py refused its flags: .*unrecognized arguments: --no-such"):
        gpu_check.check_flags([sys.executable, str(REPO / "benchmarks" / "sampling.py"), "--no-such"])
    with pytest.raises(gpu_check.StepFailed, match="--batch-size must be >= 1"):
        gpu_check.check_flags([sys.executable, "jobs/train.py", "--batch-size", "0"])
    gpu_check.check_flags([sys.executable, "-c", gpu_check.TF32_LAUNCHER, "--device", "cpu", "--methods", "cached"])
