"""One GPU acceptance run: every GPU path of the project checked or measured, one table at the end.

    python3 benchmarks/gpu_check.py --out $OUT                    # one H100/H200: <= 8 minutes (--budget-s 480)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick # the rehearsal on a CPU: small models, minutes
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --dry-run  # each command built and its flags checked

Steps, most important first (each a command of the project's own, in a process of its own):

    ray               Ray importable; if not, installed offline from the trimmed wheels (benchmarks/ray_for_gpu.py)
    cuda-tests        pytest -k cuda on tests/test_gated.py, tests/test_fused.py: one row per test id
    sampling-cached   benchmarks/sampling.py, reference model, batches 256/1024/4096: cached+graph float32 and bf16
    sampling-fused    the same for the fused kernel, float32 and bf16
    sampling-tf32     the fused kernel with torch's float32 matmuls in TF32 (set in sampling.py's processes)
    ray-train         jobs/train.py --use-gpu --num-workers 1 (NCCL) for 300 steps on MNIST
    generation        benchmarks/generation.py: jobs/generate.py on one GPU actor beside the bare loop, 200,000
                      reference-model samples with the fastest sampler measured above
    tiles, tiles-tf32 a short fused tile sweep at batch 4096 per dtype, and the fastest valid tiles
    train-throughput  benchmarks/train_throughput.py: eager float32 vs --amp bf16 --compile, images/s and MFU

Every row is a pass/fail or a figure. A step that fails (exit status, exception, its own time budget)
becomes a FAIL row with its first error line and the run goes on; once --budget-s has passed, the
steps left are SKIPPED. ``--device cpu --quick`` runs every step that needs no CUDA on small models
(the CUDA-only ones are SKIPPED, and sampling-tf32 runs the cached sampler as a stand-in), so a typo
shows up here and not on a lent GPU; ``--dry-run`` only builds each step's command and has its script's
parser check the flags (tests/test_gpu_check.py; the scripts themselves run in tests/test_benchmarks.py). The table goes to stdout and, as
gpu_check.json and gpu_check.md, with every command's output in gpu_check.log, to --out.
docs/gpu.md says how to run it on a lent GPU and what to do with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import gzip
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
PY = sys.executable
CUDA_TESTS = ("tests/test_gated.py", "tests/test_fused.py")
DEFAULT_TILES = "64x64x4,64x128x4,128x128x8x2"  # sweep choices beside fused.py's defaults (KxNxWARPS[xSTAGES])
TILE_KNOBS = ("BLOCK_K", "BLOCK_N", "NUM_WARPS", "NUM_STAGES")  # pixelcnn/sampling/fused.py's, in that order
# sampling.py's fast methods and what the table calls them (on a GPU "cached" replays a CUDA graph)
LABELS = {"cached": "cached+graph float32", "bf16": "cached+graph bf16", "fused": "fused float32",
          "fused-bf16": "fused bf16"}
# the generation job's --sampler/--dtype for each sampling row it could pick as the fastest
JOB_SAMPLERS = {"cached": ("cached", "float32"), "bf16": ("cached", "bfloat16"), "fused": ("fused", "float32"),
                "fused-bf16": ("fused", "bfloat16")}
MIN_STEP_S = 15  # a step is not started with less of the global budget left
LOG_HEAD, LOG_TAIL = 4_000, 60_000  # characters of each command's output kept in gpu_check.log

PASS, FAIL, SKIP = "pass", "FAIL", "SKIPPED"


class StepFailed(Exception):
    """A step's command failed; the message is its first error line."""


class StepTimedOut(StepFailed):
    """A step's command ran out of time (its own budget or the global deadline)."""


class DryRun(Exception):
    """--dry-run: a step's command was built and its script's parser took its flags; it did not run."""


@dataclasses.dataclass
class Row:
    step: str
    name: str
    status: str  # PASS (a check that passed, or a figure that was measured), FAIL or SKIP
    figure: str = ""
    detail: str = ""  # the first error line, why it was skipped, or a note
    numbers: dict = dataclasses.field(default_factory=dict)  # the raw figures, for the JSON


@dataclasses.dataclass
class Step:
    name: str
    title: str  # the row a skipped or failed step leaves
    run: Callable[["Check", float], list[Row]]
    budget_s: float  # its own time limit on a GPU
    cpu_budget_s: float  # and on a CPU (--quick: small models, but 2 busy cores and Ray's start-up)
    needs_cuda: bool = False


# --- running commands -------------------------------------------------------------------------------------


def child_env(one_thread: bool) -> dict:
    """The children's environment: a loopback-only, token-free Ray of their own (as the tests' base_env),
    compiled (not interpreted) Triton kernels, unbuffered output, the repo importable; ``one_thread``:
    one OpenMP thread per process (on a busy 2-core machine two spinning threads per process made the
    quick run's sampling 50x slower)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "TRITON_INTERPRET"}
    ray_tmp = os.path.join("/tmp", f"gck-{os.getpid()}")  # short: Ray's Unix sockets live under it
    os.makedirs(ray_tmp, exist_ok=True)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    return env


def error_line(text: str) -> str:
    """The line of a command's output that names what went wrong: the last exception line (a traceback
    ends with it), else the first line that says error or failed, else the last line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    lines = [re.sub(r"^\((\w+ )?pid=\d+(, ip=[\d.]+)?\)\s*", "", line) for line in lines if line]  # Ray's prefixes
    exception = re.compile(r"^([\w.]+\.)?\w*(Error|Exception|Exit|Interrupt)\b(:|$)")
    for line in reversed(lines):
        if exception.match(line) or line.startswith("error:"):
            return line[:300]
    for line in lines:
        if re.search(r"error|failed", line, re.I):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def shown(cmd: list[str]) -> str:
    return " ".join(cmd if cmd[1] != "-c" else [cmd[0], "-c", "<code>", *cmd[3:]])


def check_flags(cmd: list[str]) -> None:
    """--dry-run: the flags of ``python <script.py> ...`` (or of sampling.py behind the TF32 launcher) parsed
    by that script's own ``parse_args``, in this process; a refusal is StepFailed with its error line.
    Other commands (pip, pytest) hold no flags of ours."""
    if cmd[1] == "-c":
        compile(cmd[2], "<python -c>", "exec")
        script, args = (os.path.join(BENCH, "sampling.py"), cmd[3:]) if cmd[2] == TF32_LAUNCHER else (None, [])
    else:
        script, args = (cmd[1], cmd[2:]) if cmd[1].endswith(".py") else (None, [])
    if script is None:
        return
    spec = importlib.util.spec_from_file_location(f"dry_run_{os.path.basename(script)[:-3]}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    sys.path[:0] = [os.path.dirname(script), REPO]  # as `python <script>` would see its folder and the repo
    err = io.StringIO()
    try:
        spec.loader.exec_module(module)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(args)
    except SystemExit:
        raise StepFailed(f"{os.path.relpath(script, REPO)} refused its flags: {error_line(err.getvalue())}") from None
    finally:
        del sys.path[:2]


def stop(proc: subprocess.Popen) -> None:
    """End a command that ran out of time and everything it started in its session (Ray's processes too)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Check:
    """One acceptance run: its settings, the global deadline, the rows so far, and the command runner."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.gpu = args.device == "cuda"
        self.quick = args.quick
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        os.makedirs(args.out, exist_ok=True)
        self.work = args.work or tempfile.mkdtemp(prefix="gpu-check-")
        os.makedirs(self.work, exist_ok=True)
        self.env = child_env(one_thread=args.quick and not self.gpu)
        self.rows: list[Row] = []
        self.machine: dict = {}
        self.log_path = os.path.join(args.out, "gpu_check.log")
        open(self.log_path, "w").close()
        self.current: subprocess.Popen | None = None
        self._outputs = itertools.count()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], timeout: float, *, probe: bool = False) -> str:
        """``cmd`` in the repo root, in a session of its own; returns its output (stdout and stderr
        together). A non-zero exit or the timeout raises StepFailed with the output's error line. With
        --dry-run a step's command (not a probe) is only checked by its script's parser: DryRun."""
        if self.args.dry_run and not probe:
            check_flags(cmd)
            self._log(cmd, "", "dry run: flags accepted, not run", 0.0)
            raise DryRun(shown(cmd))
        timeout = max(1.0, min(timeout, self.remaining()))
        path = os.path.join(self.work, f"output-{next(self._outputs):03d}.txt")
        start = time.monotonic()
        with open(path, "w") as out:  # a file, not a pipe: processes left behind cannot block the read
            self.current = proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                   start_new_session=True)
            try:
                proc.wait(timeout=timeout)
                timed_out = False
                try:  # what it left running in its session (a Ray node after a crash) would slow the next steps
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            except subprocess.TimeoutExpired:
                stop(proc)
                timed_out = True
            finally:
                self.current = None
        with open(path, errors="replace") as f:
            text = f.read()
        self._log(cmd, text, "timed out" if timed_out else f"exit {proc.returncode}", time.monotonic() - start)
        if timed_out:
            raise StepTimedOut(f"timed out after {timeout:.0f} s (last line: {error_line(text)})")
        if proc.returncode:
            raise StepFailed(error_line(text))
        return text

    def _log(self, cmd: list[str], text: str, how: str, seconds: float) -> None:
        if len(text) > LOG_HEAD + LOG_TAIL:  # keep the log small enough to come back from a device run
            text = text[:LOG_HEAD] + f"\n[... {len(text) - LOG_HEAD - LOG_TAIL} characters left out ...]\n" + text[-LOG_TAIL:]
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {shown(cmd)}\n[{how}, {seconds:.1f} s]\n{text}")

    def probe(self, code: str, timeout: float = 120) -> str:
        """The last line ``python -c code`` prints (run even with --dry-run: the tables need the machine)."""
        return self.run([PY, "-c", code], timeout, probe=True).strip().splitlines()[-1]

    def passed(self, step: str, contains: str = "") -> list[Row]:
        return [r for r in self.rows if r.step == step and r.status == PASS and contains in r.name]


# --- steps ------------------------------------------------------------------------------------------------

RAY_PROBE = "import ray, ray.data, ray.train.torch; print(ray.__version__)"


def step_ray(c: Check, timeout: float) -> list[Row]:
    """Ray importable with Data and Train (the machine probe tried); if not, installed offline from the
    carried wheels."""
    if not c.machine.get("ray", "missing").startswith("missing"):
        return [Row("ray", "Ray, Ray Data and Ray Train import", PASS, f"ray {c.machine['ray']}", "already installed")]
    missing = c.machine.get("ray", "missing")
    wheels = os.path.abspath(c.args.wheels)
    found = sorted(glob.glob(os.path.join(wheels, "ray-*.whl")))
    if not found:
        raise StepFailed(f"{missing}; and no ray wheel in {wheels}: run benchmarks/ray_for_gpu.py where pip reaches "
                         "PyPI and carry its folder")
    version = os.path.basename(found[0]).split("-")[1]
    start = time.monotonic()
    try:  # into this interpreter's environment, Ray's requirements resolved against what is installed
        c.run([PY, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, f"ray[data,train]=={version}"],
              timeout)
        how = "pip install --no-index --find-links"
    except StepFailed as e:  # e.g. a read-only environment: every carried wheel into a folder of our own
        site = os.path.join(c.work, "site")
        c.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
               *sorted(glob.glob(os.path.join(wheels, "*.whl")))], timeout - (time.monotonic() - start))
        c.env["PYTHONPATH"] = os.pathsep.join([REPO, site, c.env["PYTHONPATH"]])
        how = f"pip install --target {site} (the resolved install said: {e})"
    installed = c.probe(RAY_PROBE)
    return [Row("ray", "Ray, Ray Data and Ray Train import", PASS, f"ray {installed}",
                f"installed from {os.path.relpath(wheels, REPO)} in {time.monotonic() - start:.0f} s: {how}")]


def junit_rows(path: str) -> list[Row]:
    """One row per test case of a pytest --junitxml report."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        status, detail = PASS, ""
        for tag, mark in (("failure", FAIL), ("error", FAIL), ("skipped", SKIP)):
            found = case.find(tag)
            if found is not None:
                status = mark
                detail = (found.get("message") or found.text or tag).strip().splitlines()[0][:300]
                break
        rows.append(Row("cuda-tests", test_id, status, f"{float(case.get('time', 0)):.1f} s", detail))
    return rows


def step_cuda_tests(c: Check, timeout: float) -> list[Row]:
    """The graphed and fused samplers on the GPU against the CPU sampler: pass/fail per test id."""
    report = os.path.join(c.work, "cuda-tests.xml")
    failure = None
    try:
        c.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS, "-k", "cuda", f"--junitxml={report}",
               f"--basetemp={os.path.join(c.work, 'pytest')}"], timeout)
    except StepFailed as e:  # failing tests exit non-zero: the report still says which
        failure = e
    rows = junit_rows(report) if os.path.exists(report) else []
    if not rows:
        raise failure or StepFailed("pytest ran no test")
    return rows


def sampling_model(c: Check) -> str:
    return "mid" if c.quick else "reference"


def targets(c: Check) -> bool:
    """Whether the project's sampling targets apply: the reference model on a GPU."""
    return c.gpu and not c.quick


def sampling_batches(c: Check) -> list[int]:
    if c.args.batches:
        return [int(b) for b in c.args.batches.split(",")]
    return ([256] if c.gpu else [1]) if c.quick else [256, 1024, 4096]


TF32_LAUNCHER = ("import sys; sys.path[:0] = [{bench!r}, {repo!r}]; import gpu_check; "
                 "gpu_check.sampling_in_tf32()").format(bench=BENCH, repo=REPO)
_MEASURE = None  # sampling.measure as sampling.py defines it, in the process that patched it


def measure_in_tf32(*args, **kwargs) -> dict:
    """sampling.measure with torch's float32 matmuls in TF32 (the fused kernel follows that setting);
    the row records the setting it was measured under. Runs in sampling.py's process and in the children
    it spawns for tile choices, which import this module afresh (there sampling.measure is unpatched)."""
    import sampling
    import torch

    torch.backends.cuda.matmul.fp32_precision = "tf32"
    row = (_MEASURE or sampling.measure)(*args, **kwargs)
    row["fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
    return row


def sampling_in_tf32() -> None:
    """benchmarks/sampling.py's main (arguments from sys.argv) with every measurement in TF32. sampling.py
    has no flag for it; the setting must be made in each process it measures in."""
    global _MEASURE
    import sampling

    _MEASURE, sampling.measure = sampling.measure, measure_in_tf32
    sys.argv = [os.path.join(BENCH, "sampling.py"), *sys.argv[1:]]
    sampling.main()


def sampling_json(c: Check, methods: list[str], batches: list[int], timeout: float, tiles: str = "",
                  tf32: bool = False) -> list[dict]:
    """The rows of one benchmarks/sampling.py run (its --json)."""
    path = os.path.join(c.work, f"sampling-{time.monotonic_ns()}.json")
    args = ["--device", c.args.device, "--models", sampling_model(c), "--batches", ",".join(map(str, batches)),
            "--methods", ",".join(methods), "--verify-naive", "0", "--json", path]
    if tiles:
        args += ["--fused-tiles", tiles]
    cmd = [PY, "-c", TF32_LAUNCHER, *args] if tf32 else [PY, os.path.join(BENCH, "sampling.py"), *args]
    c.run(cmd, timeout)
    with open(path) as f:
        return json.load(f)


def run_sampling(c: Check, methods: list[str], timeout: float, batches: list[int], tiles: str = "",
                 tf32: bool = False) -> list[dict]:
    """sampling.py's rows for these methods, each tagged with the run it came from (ratios are taken
    to that run's naive rate). One run for all methods; if it fails, one run per method: a method that
    fails in sampling.py's own process ends the run and loses the others' figures."""
    end = time.monotonic() + timeout
    try:
        runs = [sampling_json(c, methods, batches, timeout, tiles, tf32)]
    except StepFailed as e:
        if len(methods) == 1 or isinstance(e, StepTimedOut):  # no time left to retry in
            raise
        first = e
        runs = []
        for method in methods:
            try:
                runs.append(sampling_json(c, [method], batches, end - time.monotonic(), tiles, tf32))
            except StepFailed as e:
                runs.append([{"method": method, "error": str(e)}])
        if all("error" in rows[0] for rows in runs):
            raise first
    return [{**row, "run": k} for k, rows in enumerate(runs) for row in rows]


def sampling_rows(step: str, raw: list[dict], methods: list[str], batches: list[int], labels: dict,
                  tf32: bool = False, targets: bool = False) -> list[Row]:
    """One row per method and batch with default tiles: samples/s and the ratio to naive (and, for the
    reference model on a GPU, the project's targets: 500x naive at batch 256, 1,100 samples/s)."""
    naive = {(r["run"], r["batch"]): r["samples_per_s"] for r in raw if r.get("method") == "naive"}
    rows = []
    for method in methods:
        failed = next((r["error"] for r in raw if r.get("method") == method and "batch" not in r), None)
        for batch in batches:
            name = f"{labels[method]}, batch {batch}"
            r = next((r for r in raw if r.get("method") == method and r.get("batch") == batch and "tiles" not in r), None)
            if r is None:
                rows.append(Row(step, name, FAIL, detail=failed or "sampling.py gave no figure"))
                continue
            if tf32 and r.get("fp32_precision") != "tf32":
                rows.append(Row(step, name, FAIL, detail=f"measured with fp32_precision={r.get('fp32_precision')}, not tf32"))
                continue
            base = naive.get((r["run"], batch))
            ratio = r["samples_per_s"] / base if base else float("nan")
            numbers = {"method": method, "batch": batch, "samples_per_s": r["samples_per_s"], "naive_samples_per_s": base,
                       "ratio_to_naive": ratio, "peak_mb": r.get("peak_mb")}
            detail = f"peak {r.get('peak_mb', 0):,.0f} MB"
            if "bf16_log_prob_error_bits_per_dim" in r:
                numbers["bf16_log_prob_error_bits_per_dim"] = r["bf16_log_prob_error_bits_per_dim"]
                detail += f"; log-prob vs float32 {r['bf16_log_prob_error_bits_per_dim']:.1e} bits/dim"
            if targets and batch == 256:
                detail += "; 500x target " + ("met" if ratio >= 500 else "not met")
            if targets:
                detail += "; 1,100/s target " + ("met" if r["samples_per_s"] >= 1100 else "not met")
            rows.append(Row(step, name, PASS, f"{rate(r['samples_per_s'])} samples/s, {ratio:,.0f}x naive", detail, numbers))
    return rows


def naive_rows(step: str, raw: list[dict], batches: list[int]) -> list[Row]:
    rows = []
    for r in raw:
        if "ops_per_pixel_step" in r:
            rows.append(Row(step, f"cached sampler ops per pixel step ({r['model']})", PASS,
                            f"{r['ops_per_pixel_step']:.0f}", numbers=r))
    for batch in batches:
        r = next((r for r in raw if r.get("method") == "naive" and r.get("batch") == batch and r["run"] == 0), None)
        if r:
            rows.append(Row(step, f"naive, batch {batch}", PASS, f"{r['samples_per_s']:,.3g} samples/s",
                            f"{r['how']}; peak {r['peak_mb']:,.0f} MB", {"batch": batch, **r}))
    return rows


def step_sampling_cached(c: Check, timeout: float) -> list[Row]:
    methods, batches = (["cached", "bf16"] if c.gpu else ["cached"]), sampling_batches(c)
    raw = run_sampling(c, methods, timeout, batches)
    labels = LABELS if c.gpu else {"cached": "cached float32"}
    rows = sampling_rows("sampling-cached", raw, methods, batches, labels, targets=targets(c))
    return rows + naive_rows("sampling-cached", raw, batches)


def step_sampling_fused(c: Check, timeout: float) -> list[Row]:
    methods, batches = ["fused", "fused-bf16"], sampling_batches(c)
    raw = run_sampling(c, methods, timeout, batches)
    return sampling_rows("sampling-fused", raw, methods, batches, LABELS, targets=targets(c))


def step_sampling_tf32(c: Check, timeout: float) -> list[Row]:
    """The fused kernel in TF32; on a CPU the cached sampler stands in, to run the TF32 launcher."""
    method, batches = ("fused" if c.gpu else "cached"), sampling_batches(c)
    label = "fused TF32" if c.gpu else "cached float32, TF32 launcher (CPU stand-in)"
    raw = run_sampling(c, [method], timeout, batches, tf32=True)
    return sampling_rows("sampling-tf32", raw, [method], batches, {method: label}, tf32=True, targets=targets(c))


def fused_default_tiles() -> str:
    """fused.py's tile defaults as KxNxWARPSxSTAGES, read from its source (no import: that needs Triton)."""
    with open(os.path.join(REPO, "pixelcnn", "sampling", "fused.py")) as f:
        text = f.read()
    found = [re.search(rf"^{knob} = (\d+)", text, re.M) for knob in TILE_KNOBS]
    return "x".join(m.group(1) for m in found) if all(found) else "fused.py's"


def tile_rows(step: str, raw: list[dict], methods: list[str], labels: dict, batch: int) -> list[Row]:
    """A row per (dtype, tile choice) and, per dtype, the fastest valid tiles (fused.py's defaults included)."""
    default = fused_default_tiles()
    rows = []
    for method in methods:
        label = labels[method]
        timed = [r for r in raw if r.get("method") == method and r.get("batch") == batch]
        for r in timed:
            name = f"{label}, tiles {r.get('tiles', default + ' (default)')}, batch {batch}"
            if "error" in r:
                rows.append(Row(step, name, FAIL, detail=r["error"]))
            else:
                rows.append(Row(step, name, PASS, f"{r['samples_per_s']:,.1f} samples/s",
                                numbers={"method": method, "tiles": r.get("tiles", default), **r}))
        valid = [r for r in timed if "error" not in r]
        if not valid:
            rows.append(Row(step, f"fastest tiles, {label}", FAIL, detail="no tile choice ran"))
            continue
        best = max(valid, key=lambda r: r["samples_per_s"])
        base = next((r for r in valid if "tiles" not in r), None)
        gain = f" ({best['samples_per_s'] / base['samples_per_s'] - 1:+.0%} vs the default)" if base else ""
        tiles = best.get("tiles", default)
        knobs = dict(zip(TILE_KNOBS, map(int, tiles.split("x")))) if re.fullmatch(r"[\dx]+", tiles) else {}
        rows.append(Row(step, f"fastest tiles, {label}", PASS, f"{tiles}: {best['samples_per_s']:,.1f} samples/s{gain}",
                        "fused.py: " + ", ".join(f"{k} = {v}" for k, v in knobs.items()),
                        {"method": method, "tiles": tiles, "knobs": knobs, "samples_per_s": best["samples_per_s"]}))
    return rows


def sweep_batch(c: Check) -> int:
    return max(sampling_batches(c))


def step_tiles(c: Check, timeout: float) -> list[Row]:
    methods, batch = ["fused", "fused-bf16"], sweep_batch(c)
    return tile_rows("tiles", run_sampling(c, methods, timeout, [batch], tiles=c.args.tiles), methods, LABELS, batch)


def step_tiles_tf32(c: Check, timeout: float) -> list[Row]:
    batch = sweep_batch(c)
    raw = run_sampling(c, ["fused"], timeout, [batch], tiles=c.args.tiles, tf32=True)
    if any("samples_per_s" in r and r.get("fp32_precision") != "tf32" for r in raw):
        raise StepFailed("a tile choice was measured without TF32")
    return tile_rows("tiles-tf32", raw, ["fused"], {"fused": "fused TF32"}, batch)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def mnist_root(c: Check) -> tuple[str, str] | tuple[None, None]:
    """A torchvision MNIST root (MNIST/raw holding the four plain files): the first --mnist folder that has
    them, plain or as .gz (unpacked into the work folder; torchvision reads only the plain files)."""
    for src in c.args.mnist.split(","):
        raw = {}
        for root, _, files in os.walk(src):
            for name in files:
                base = name[:-3] if name.endswith(".gz") else name
                if base in MNIST_FILES:
                    raw.setdefault(base, {})[name.endswith(".gz")] = os.path.join(root, name)
        if set(raw) != set(MNIST_FILES):
            continue
        plain = {base: found.get(False) for base, found in raw.items()}
        dirs = {os.path.dirname(p) for p in plain.values() if p}
        if all(plain.values()) and len(dirs) == 1 and next(iter(dirs)).endswith(os.path.join("MNIST", "raw")):
            return os.path.dirname(os.path.dirname(dirs.pop())), src  # the folder above MNIST/raw
        dest = os.path.join(c.work, "mnist", "MNIST", "raw")
        os.makedirs(dest, exist_ok=True)
        for base, found in raw.items():
            if found.get(False):
                shutil.copyfile(found[False], os.path.join(dest, base))
            else:
                with gzip.open(found[True]) as f, open(os.path.join(dest, base), "wb") as out:
                    shutil.copyfileobj(f, out)
        return os.path.join(c.work, "mnist"), src
    return None, None


def last_json(text: str) -> dict:
    return json.loads([line for line in text.strip().splitlines() if line.startswith("{")][-1])


def step_ray_train(c: Check, timeout: float) -> list[Row]:
    """jobs/train.py itself on one worker: NCCL and the GPU with --use-gpu, gloo on a CPU."""
    root, source = mnist_root(c)
    data = ["--dataset", "mnist", "--data-dir", root] if root else ["--dataset", "synthetic"]
    note = f"MNIST from {os.path.relpath(source, REPO)}" if root else "MNIST not found (--mnist): synthetic data"
    steps = 20 if c.quick else c.args.train_steps
    size = (["--hidden", "8", "--blocks", "1", "--subset", "1024", "--test-subset", "256", "--batch-size", "32",
             "--grid-samples", "4"] if c.quick else
            ["--hidden", "128", "--blocks", "15", "--batch-size", "128", "--test-subset", "2000", "--grid-samples", "16"])
    cmd = [PY, "jobs/train.py", *data, *size, "--max-steps", str(steps), "--log-every", str(max(10, steps // 3)),
           "--storage", os.path.join(c.work, "runs"), "--name", "gpu-check", "--num-workers", "1"]
    cmd += ["--use-gpu"] if c.gpu else []
    start = time.monotonic()
    out = c.run(cmd, timeout)
    seconds = time.monotonic() - start
    final = last_json(out)
    device = re.search(r"Moving model to device: (\S+)", out)
    device = device.group(1) if device else "?"
    name = "jobs/train.py --use-gpu --num-workers 1 (NCCL)" if c.gpu else "jobs/train.py --num-workers 1 (gloo, CPU)"
    if final.get("step", 0) < steps:
        raise StepFailed(f"stopped at step {final.get('step')} of {steps}")
    if c.gpu and not device.startswith("cuda"):
        raise StepFailed(f"the Ray Train worker used {device}, not the GPU")
    return [Row("ray-train", name, PASS,
                f"{steps} steps, {final['images_per_s']:,.0f} images/s, test {final['test_bits_per_dim']:.3f} bits/dim, "
                f"{seconds:.0f} s with Ray start-up", f"worker device {device}; {note}",
                {**final, "seconds": seconds, "device": device})]


def pick_job_sampler(c: Check) -> tuple[str, str, str]:
    """The generation job's (sampler, dtype) and why: the fastest passing sampling row at the largest
    batch among those the job can run; the fused kernel only if its CUDA test passed."""
    fused_ok = any("test_fused.py" in r.name for r in c.passed("cuda-tests"))
    candidates = [r for step in ("sampling-cached", "sampling-fused") for r in c.passed(step)
                  if r.numbers.get("method") in JOB_SAMPLERS and r.numbers.get("batch") == max(sampling_batches(c))
                  and (fused_ok or not r.numbers["method"].startswith("fused"))]
    if not candidates:
        return "cached", "float32", "no sampling figure to choose by"
    best = max(candidates, key=lambda r: r.numbers["samples_per_s"])
    sampler, dtype = JOB_SAMPLERS[best.numbers["method"]]
    return sampler, dtype, f"fastest at batch {best.numbers['batch']}: {best.name.split(',')[0]}"


def parse_figures(text: str) -> dict[str, float]:
    """``name: 123.4 ...`` lines (benchmarks/generation.py's output) -> {name: 123.4}."""
    figures = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z /]+):\s+([\d.]+)", line.strip())
        if m:
            figures[m.group(1).strip()] = float(m.group(2))
    return figures


def step_generation(c: Check, timeout: float) -> list[Row]:
    """jobs/generate.py on one GPU actor beside the bare loop (benchmarks/generation.py)."""
    sampler, dtype, why = pick_job_sampler(c)
    n = 1024 if c.quick else c.args.gen_samples
    batch = 256 if c.quick else max(sampling_batches(c))  # 4096: the job's GPU default
    size = ["--hidden", "8", "--blocks", "1"] if c.quick else ["--hidden", "128", "--blocks", "15"]
    cmd = [PY, os.path.join(BENCH, "generation.py"), *size, "--num-samples", str(n), "--batch-size", str(batch),
           "--rows-per-file", str(max(batch, n // 10)), "--num-actors", "1", "--gpus-per-actor", "1" if c.gpu else "0",
           "--sampler", sampler, "--dtype", dtype]
    out = c.run(cmd, timeout)
    figures = parse_figures(out)
    bare, job = figures["bare sampler loop"], figures["whole job"]
    hours = 1e6 / job / 3600
    what = f"{n:,} samples, {'reference model' if not c.quick else 'hidden 8, 1 block'}, --sampler {sampler} --dtype {dtype}"
    numbers = {"sampler": sampler, "dtype": dtype, "num_samples": n, "batch_size": batch, "bare_samples_per_s": bare,
               "job_samples_per_s": job, "job_over_bare": job / bare, "hours_per_million": hours}
    actor = "1 GPU actor" if c.gpu else "1 CPU actor"
    return [
        Row("generation", "bare pixelcnn.sample loop", PASS, f"{bare:,.1f} samples/s", what, numbers),
        Row("generation", f"jobs/generate.py, {actor}", PASS, f"{job:,.1f} samples/s", f"Ray start-up, PNG, Parquet "
            f"included; sampler chosen as the {why}"),
        Row("generation", "job / bare", PASS, f"{job / bare:.2f}", "target 0.9: " + ("met" if job / bare >= 0.9 else "not met")),
        Row("generation", "hours per million samples" + (" per GPU" if c.gpu else ""), PASS,
            f"{hours:.3g} h ({hours * 60:,.1f} min)", "at the whole job's rate"),
    ] + encode_rows(out)


def encode_rows(text: str) -> list[Row]:
    """generation.py's encode rate lines, where it prints them: the CPU work (PNG, Arrow) per sample."""
    rows = []
    for m in re.finditer(r"^encode rate \((?P<what>[^)]+)\): (?P<rate>[\d,.]+) rows/s per core(?P<rest>.*)$", text, re.M):
        rows.append(Row("generation", f"PNG + Arrow encode rate ({m['what']})", PASS, f"{m['rate']} rows/s per core",
                        m["rest"].strip(" ()"), {"rows_per_s_per_core": float(m["rate"].replace(",", ""))}))
    return rows


THROUGHPUT_LINE = re.compile(r"^(?P<name>\S.*?)\s+(?P<ips>[\d.]+) images/s per worker\s+(?P<gflops>[\d.]+) GFLOP/s "
                             r"per worker(?:\s+MFU (?P<mfu>[\d.]+)% of bf16 peak)?")


def throughput_rows(text: str) -> list[Row]:
    """benchmarks/train_throughput.py's lines -> a row per configuration, with its ratio to eager."""
    found = [m.groupdict() for m in map(THROUGHPUT_LINE.match, text.splitlines()) if m]
    if not found:
        raise StepFailed("train_throughput.py printed no images/s line")
    eager = next((float(f["ips"]) for f in found if f["name"].startswith("eager fp32, 1 worker")), None)
    rows = []
    for f in found:
        ips, tflops = float(f["ips"]), float(f["gflops"]) / 1e3
        figure = f"{ips:,.1f} images/s, {tflops:.3g} TFLOP/s" + (f", MFU {f['mfu']}%" if f["mfu"] else "")
        detail = f"{ips / eager:.2f}x eager fp32" if eager else ""
        rows.append(Row("train-throughput", f"training step, {f['name']}", PASS, figure, detail,
                        {"images_per_s_per_worker": ips, "tflops": tflops, "mfu_percent": float(f["mfu"] or "nan")}))
    return rows


def step_train_throughput(c: Check, timeout: float) -> list[Row]:
    cmd = [PY, os.path.join(BENCH, "train_throughput.py"), "--device", c.args.device]
    if c.quick:
        cmd += ["--hidden", "8", "--blocks", "1", "--batch", "8", "--steps", "2"]
    rows = []
    if c.quick and not c.gpu:  # compiling takes a minute on 2 cores; the GPU run compiles
        cmd.append("--no-compile")
        rows.append(Row("train-throughput", "training step, compile, 1 worker", SKIP,
                        detail="--quick on a CPU leaves torch.compile out"))
    return throughput_rows(c.run(cmd, timeout)) + rows


STEPS = [  # most important first: the ones the global deadline cuts are the last
    Step("ray", "Ray importable (installed from the carried wheels if not)", step_ray, 120, 120),
    Step("cuda-tests", "pytest -k cuda: graphed and fused samplers vs the CPU sampler", step_cuda_tests, 150, 0, True),
    Step("sampling-cached", "cached+graph sampler, float32 and bf16", step_sampling_cached, 100, 240),
    Step("sampling-fused", "fused sampler, float32 and bf16", step_sampling_fused, 120, 0, True),
    Step("sampling-tf32", "fused sampler, TF32", step_sampling_tf32, 80, 240),
    Step("ray-train", "jobs/train.py --use-gpu, one worker", step_ray_train, 120, 300),
    Step("generation", "jobs/generate.py on one GPU actor vs the bare loop", step_generation, 180, 300),
    Step("tiles", "fused tile sweep, float32 and bf16", step_tiles, 120, 0, True),
    Step("tiles-tf32", "fused tile sweep, TF32", step_tiles_tf32, 80, 0, True),
    Step("train-throughput", "training images/s and MFU, eager fp32 vs bf16 + compile", step_train_throughput, 120, 240),
]


# --- the run and its table --------------------------------------------------------------------------------

MACHINE_PROBE = """
import importlib, json, os, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpus": os.cpu_count()}
for name, modules in (("triton", ["triton"]), ("ray", ["ray", "ray.data", "ray.train.torch"])):
    try:
        info[name] = [importlib.import_module(m) for m in modules][0].__version__
    except Exception as e:  # the ray step installs it
        info[name] = f"missing ({type(e).__name__}: {e})"
print(json.dumps(info))
"""


def describe_machine(c: Check) -> dict:
    try:
        info = json.loads(c.probe(MACHINE_PROBE))
    except (StepFailed, ValueError) as e:
        info = {"error": str(e)}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        info["driver"] = smi[0].split(",")[1].strip() if smi else None
        info["gpu_memory"] = smi[0].split(",")[2].strip() if smi else None
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = None
    info["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return info


def machine_line(m: dict) -> str:
    return (f"GPU {m.get('gpu') or 'none'} ({m.get('gpu_memory') or '-'}), driver {m.get('driver') or '-'}, torch "
            f"{m.get('torch')} (CUDA {m.get('cuda') or '-'}), Triton {m.get('triton')}, Ray {m.get('ray')}, Python "
            f"{m.get('python')}, {m.get('cpus')} CPUs, {m.get('date')}")


def run_step(c: Check, step: Step, selected: set[str]) -> list[Row]:
    if step.name not in selected:
        return [Row(step.name, step.title, SKIP, detail="not selected (--only/--skip)")]
    if step.needs_cuda and not c.gpu:
        return [Row(step.name, step.title, SKIP, detail="needs CUDA (--device cpu)")]
    if c.remaining() < MIN_STEP_S:
        return [Row(step.name, step.title, SKIP, detail=f"global deadline: --budget-s {c.args.budget_s:.0f} spent")]
    start = time.monotonic()
    try:
        rows = step.run(c, min(step.budget_s if c.gpu else step.cpu_budget_s, c.remaining()))
    except DryRun as e:
        rows = [Row(step.name, step.title, SKIP, detail=f"dry run: {e}")]
    except Exception as e:  # a step's failure is its row; the run goes on
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        rows = [Row(step.name, step.title, FAIL, detail=line if isinstance(e, StepFailed) else f"{type(e).__name__}: {line}")]
    for row in rows:
        row.numbers.setdefault("step_seconds", round(time.monotonic() - start, 1))
    return rows


def text_table(rows: list[Row]) -> str:
    cells = [("step", "check", "result", "figure", "detail")]
    cells += [(r.step, r.name, r.status, r.figure, r.detail[:90]) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row[:4], widths)) + "  " + row[4] for row in cells)


def markdown(c: Check, seconds: float) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"# GPU check, {c.machine.get('date')}", "", machine_line(c.machine), "",
             f"`{' '.join(sys.argv)}`: {seconds:.0f} s of a {c.args.budget_s:.0f} s budget", "",
             "| step | check | result | figure | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r.step} | {cell(r.name)} | {r.status} | {cell(r.figure)} | {cell(r.detail)} |" for r in c.rows]
    return "\n".join(lines + ["", *summary(c), ""])


def summary(c: Check) -> list[str]:
    """What to do with the figures: fused.py's tile defaults, the generation job's GPU batch."""
    lines = []
    best = [r for step in ("tiles", "tiles-tf32") for r in c.passed(step, "fastest tiles")]
    if best:
        lines.append("fastest fused tiles per dtype (fused.py's BLOCK_K x BLOCK_N x NUM_WARPS x NUM_STAGES, now "
                     f"{fused_default_tiles()}): " + "; ".join(f"{r.name.split(', ')[1]} {r.figure}" for r in best))
    curve = {}  # for jobs/generate.py's GPU batch default
    for r in c.passed("sampling-cached") + c.passed("sampling-fused") + c.passed("sampling-tf32"):
        if r.numbers.get("method") in LABELS:
            curve.setdefault(r.name.rsplit(", batch", 1)[0], {})[r.numbers["batch"]] = r.numbers["samples_per_s"]
    for label, points in curve.items():
        lines.append(f"samples/s by batch, {label}: " + ", ".join(f"{b}: {rate(v)}" for b, v in sorted(points.items())))
    return lines


def rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def write_outputs(c: Check, seconds: float) -> None:
    report = {"machine": c.machine, "command": sys.argv, "device": c.args.device, "quick": c.quick,
              "budget_s": c.args.budget_s, "seconds": round(seconds, 1), "rows": [dataclasses.asdict(r) for r in c.rows],
              "summary": summary(c)}
    with open(os.path.join(c.args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(c.args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(c, seconds))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the steps that need no CUDA")
    p.add_argument("--quick", action="store_true", help="small models and counts (the CPU rehearsal)")
    p.add_argument("--dry-run", action="store_true", help="build each step's command and check its flags with its "
                   "script's parser, without running it (the test suite's rehearsal)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "gpu-check"), help="folder for gpu_check.{json,md,log}")
    p.add_argument("--budget-s", type=float, default=480, help="global deadline: steps not started by then are SKIPPED")
    p.add_argument("--only", help="comma-separated steps to run (the others are SKIPPED): " + ",".join(s.name for s in STEPS))
    p.add_argument("--skip", default="", help="comma-separated steps to leave out")
    p.add_argument("--batches", help="sampling batches (default: 256,1024,4096; --quick: 1 on CPU, 256 on GPU)")
    p.add_argument("--tiles", default=DEFAULT_TILES, help="fused tile sweep: KxNxWARPS[xSTAGES] choices beside the default")
    p.add_argument("--train-steps", type=int, default=300, help="ray-train: optimizer steps")
    p.add_argument("--gen-samples", type=int, default=200_000, help="generation: samples")
    p.add_argument("--wheels", default=os.path.join(REPO, ".whl", "ray-gpu"), help="the trimmed Ray and its dependencies")
    p.add_argument("--mnist", default=",".join([os.path.join(REPO, ".data", "mnist-gz"),
                                                os.path.join(REPO, "..", "shared", "data", "mnist")]),
                   help="comma-separated folders to look for MNIST's raw files in (plain or .gz)")
    p.add_argument("--work", help="scratch folder (default: a new temporary one, removed at the end)")
    args = p.parse_args(argv)
    names = {s.name for s in STEPS}
    chosen = set(args.only.split(",")) if args.only else set(names)
    unknown = (chosen | set(filter(None, args.skip.split(",")))) - names
    if unknown:
        p.error(f"unknown steps: {','.join(sorted(unknown))} (steps: {','.join(s.name for s in STEPS)})")
    args.selected = chosen - set(args.skip.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    c = Check(args)
    keep_work = bool(args.work)
    try:
        c.machine = describe_machine(c)
        if "error" in c.machine:
            print(f"error: could not describe the machine: {c.machine['error']}", file=sys.stderr)
            return 2
        if c.gpu and not c.machine.get("gpu"):
            print("error: torch sees no CUDA device; on a CPU run --device cpu --quick", file=sys.stderr)
            return 2
        print(machine_line(c.machine), flush=True)
        for step in STEPS:
            for row in run_step(c, step, args.selected):
                c.rows.append(row)
                print(f"[{time.monotonic() - c.started:5.0f} s] {row.status:7s} {row.step}: {row.name}  {row.figure}  "
                      f"{row.detail[:120]}", flush=True)
            if step.name == "ray":  # the tables name the Ray the run used (installed, maybe, by this step)
                c.machine["ray"] = next((r.figure.split()[-1] for r in c.rows if r.step == "ray" and r.status == PASS),
                                        c.machine.get("ray"))
    except KeyboardInterrupt:
        if c.current:
            stop(c.current)
        c.rows.append(Row("-", "interrupted", FAIL, detail="Ctrl-C"))
    finally:
        seconds = time.monotonic() - c.started
        if c.machine:
            write_outputs(c, seconds)
        shutil.rmtree(c.env["RAY_TMPDIR"], ignore_errors=True)
        if not keep_work:
            shutil.rmtree(c.work, ignore_errors=True)
    print(f"\n{machine_line(c.machine)}\n{text_table(c.rows)}")
    for line in summary(c):
        print(line)
    failed = sum(r.status == FAIL for r in c.rows)
    print(f"{len(c.rows)} rows, {failed} FAIL, {sum(r.status == SKIP for r in c.rows)} SKIPPED, {seconds:.0f} s; "
          f"tables in {os.path.join(args.out, 'gpu_check.md')} and .json")
    again = rerun(c)
    if again:  # a lent machine stays warm for seconds: the line to paste
        print(f"to run again what failed or was cut by the deadline: {again}")
    return 1 if failed else 0


def rerun(c: Check) -> str:
    """The command for the steps that failed or were skipped by the deadline, or ''."""
    steps = [s.name for s in STEPS if any(r.step == s.name and (r.status == FAIL or "deadline" in r.detail)
                                          for r in c.rows)]
    if not steps:
        return ""
    flags = list(sys.argv[1:])
    for name in ("--only", "--skip"):  # replaced by the steps to run
        while name in flags:
            i = flags.index(name)
            del flags[i:i + 2]
    flags = [a for a in flags if not a.startswith(("--only=", "--skip="))]
    return " ".join([os.path.relpath(PY) if PY.startswith(REPO) else os.path.basename(PY), "benchmarks/gpu_check.py",
                     *flags, "--only", ",".join(steps)])


if __name__ == "__main__":
    sys.exit(main())
