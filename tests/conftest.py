import contextlib
import importlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Triton kernels (pixelcnn/sampling/fused.py) run in Triton's CPU interpreter in test processes: Triton reads
# this when it is first imported (its own library functions are decorated then), so it is set before
# anything can import it. Tests that compile the kernel for real run a child process with it set to 0.
os.environ.setdefault("TRITON_INTERPRET", "1")
# This process joins the tests' Ray clusters too (conftest.run_main). Ray reads this once, when it is first
# imported; without it Ray resolves 127.0.0.1 to the machine's own network address, where nothing of the
# tests listens (and where no test traffic may go).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread per process: a test's jobs, Ray workers and this process share two cores, and torch's OpenMP
# threads spin while they wait for a core (that doubled the CPU time of a test that trains here beside a job).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
# MNIST in torchvision's layout (MNIST/raw); this machine and CI keep it beside the checkout.
MNIST_ROOT = Path(os.environ.get("PIXELCNN_MNIST_ROOT", REPO.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    assert (MNIST_ROOT / "MNIST" / "raw").is_dir(), f"MNIST not found under {MNIST_ROOT}: set PIXELCNN_MNIST_ROOT"
    return MNIST_ROOT


def randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Weights far from init (incl. label embeddings that start at zero), so every path carries signal;
    BatchNorm running statistics too (not their defaults 0 and 1, which leave them untested)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
    return model


# --- end-to-end fixtures: a real S3 endpoint and a real Ray cluster, both on loopback only ----------


PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    """Environment for job processes: loopback-only Ray, no auth token, no inherited cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # single node on 127.0.0.1 only (see ../shared/notes)
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # as in this process (above), for jobs and their Ray workers (Ray sets it only if unset)
        # Ray Train's controller polls its workers every 2 s: each start, report and end waits up to that.
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
        # A raylet keeps idle workers up to this many (Ray's default: its CPUs, 4 here), killing the rest after
        # 1 s idle; a job's actors count too, so Ray Data's task workers were killed between two shards and
        # started again, ~4 CPU-s each (a generation test started 30 workers, now 21: 81 s -> 61 s).
        RAY_num_workers_soft_limit="16",
        # Ray Train starts a PreemptionWatcher actor per run (~3 CPU-s) to notice a node being drained, which no
        # test does; tests/test_train_job.py turns it back on where its console line is the point.
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        # No workers started ahead of demand: a raylet prestarts workers for the first driver and for queued
        # tasks, and in a test most of them idle until killed (~1.5 CPU-s each; ~4-6 CPU-s a training job).
        RAY_prestart_worker_first_driver="0",
        RAY_enable_worker_prestart="0",
    )
    env.update(extra)
    return env


def start_moto() -> tuple[subprocess.Popen, dict]:
    """A moto server (AWS's APIs emulated: here Secrets Manager) on a free loopback port, and the environment
    that points AWS clients at it."""
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(PYTHON), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "moto_server did not start"
            time.sleep(0.1)
    return server, {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    }


def start_seaweedfs() -> tuple[subprocess.Popen, dict, str]:
    """A real S3 server, SeaweedFS (``weed server``: master, volume, filer and S3 gateway in one process), on
    127.0.0.1 with the fake credentials the tests use; (server, the environment that points AWS clients at
    it, its data folder). Its ports: P..P+4 and its gRPC ports P+10000..P+10004, P picked below Linux's
    ephemeral range (where free_port's come from) and above Ray's worker ports (10002-19999)."""
    while True:
        port = 20000 + secrets.randbelow(2700)
        if all(port_is_free(p) for p in (*range(port, port + 5), *range(port + 10000, port + 10005))):
            break
    folder = tempfile.mkdtemp(prefix="s3", dir="/tmp")
    identities = os.path.join(folder, "identities.json")
    with open(identities, "w") as f:
        json.dump({"identities": [{"name": "tests", "credentials": [{"accessKey": "testing", "secretKey": "testing"}],
                                   "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
    os.makedirs(os.path.join(folder, "data"))
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(PYTHON), "weed"), "server", f"-dir={folder}/data", "-ip=127.0.0.1",
         "-ip.bind=127.0.0.1", "-master.telemetry=false", "-s3", f"-s3.port={port}", "-s3.port.iceberg=0",
         "-s3.port.lance=0", f"-master.port={port + 1}", f"-volume.port={port + 2}",
         f"-filer.port={port + 3}", f"-metricsPort={port + 4}", f"-s3.config={identities}",
         # Without these, a second bucket finds no writable volume (every PUT an InternalError).
         "-volume.max=64", "-master.volumeSizeLimitMB=64"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(folder, "weed.log"), "w"))
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    }
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    deadline = time.time() + 60
    while True:
        try:
            client.list_buckets()
            return server, env, folder
        except Exception:  # noqa: BLE001 (not up yet)
            assert time.time() < deadline and server.poll() is None, "weed server did not start: see " + folder
            time.sleep(0.2)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def kill_an_actor_midway(script: str, args: list, *, env: dict, title: str, temp_dir: str, started) -> str:
    """Run ``python jobs/<script>``, SIGKILL one actor process whose title names ``title`` once ``started()``
    (its first part file), and return the job's output; it must still succeed."""
    job = subprocess.Popen([PYTHON, f"jobs/{script}", *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not started():
            assert time.time() < deadline and job.poll() is None, "no part file appeared"
            time.sleep(0.1)
        actors = [pid for pid, t in process_titles(cluster_pids(temp_dir)).items() if title in t]
        assert actors, f"no {title} actor process found"
        subprocess.run(["kill", "-9", str(actors[0])], check=True)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="session")
def s3():
    """A real S3 server (SeaweedFS) on 127.0.0.1 with fake credentials, started once for the whole test run,
    plus a boto3 client for assertions: exactly-once rests on S3's own semantics (a conditional PUT that
    fails on an existing key, a listing that shows what was written), so they are not an emulator's."""
    import boto3

    server, env, folder = start_seaweedfs()
    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    )
    client.create_bucket(Bucket="pixelcnn")
    try:
        yield type("S3", (), {"env": env, "client": client, "endpoint": env["AWS_ENDPOINT_URL"]})
    finally:
        stop_processes([server.pid])
        shutil.rmtree(folder, ignore_errors=True)


def s3_keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, full command line), read from /proc (ps truncates long lines)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        procs[int(entry)] = (ppid, args)
    return procs


def cluster_pids(marker: str) -> list[int]:
    """PIDs of processes whose command line names ``marker`` (our temp dir), and their descendants."""
    procs = _processes()
    found = frontier = {pid for pid, (_, args) in procs.items() if marker in args}
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - found
        found = found | frontier
    return sorted(found)


def process_titles(pids) -> dict[int, str]:
    procs = _processes()
    return {pid: procs[pid][1] for pid in pids if pid in procs}


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """``ray start --head`` on 127.0.0.1 with 4 logical CPUs, started once for the whole test run; stopped by
    PID (never ``ray stop``). Its ``env`` names it in RAY_ADDRESS, as ``ray job submit`` does for a job, so
    every job run with that environment joins it instead of starting a Ray of its own (~10 s each).

    Its workers inherit the fake AWS settings of the S3 server, as instance profiles would give.
    """
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Unix socket paths
    port = free_port()
    env = base_env(**s3.env)
    cmd = [
        os.path.join(os.path.dirname(PYTHON), "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={port}",
        # No dashboard (~4 CPU-s a training job, its agents' polling): no test submits through it (tests/test_auth.py
        # has a cluster of its own that does). Ray Train's PlacementGroupCleaner then warns every few seconds
        # that it cannot ask the State API, which the jobs leave out (jobs.cluster.RAY_NOTICES).
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}", "--num-cpus=4", "--num-gpus=0", "--disable-usage-stats",
        # Ports of their own: Ray's fixed defaults would collide with another cluster on this machine.
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    info = type("Cluster", (), {
        "address": f"127.0.0.1:{port}", "temp_dir": temp_dir,
        "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
    })
    try:
        yield info
    finally:
        stop_processes(cluster_pids(temp_dir))


def stop_processes(pids, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds: a test cluster keeps nothing worth a
    clean shutdown, and gcs_server and raylet can ignore SIGTERM for ~10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
            time.sleep(0.2)


def run_job(script: str, *args, env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python jobs/<script>`` from the repo root; returns the completed process."""
    return start_job(script, *args, env=env).result(timeout=timeout, check=check)


class start_job:
    """``python jobs/<script>`` started from the repo root in the background; ``result()`` waits for it and
    returns what ``run_job`` returns. Jobs started together share the cores while each waits on Ray's start-up
    (a small job keeps ~1.4 of two cores busy): tests with several independent jobs start them at once."""

    def __init__(self, script: str, *args, env: dict):
        self.script, self.done, self.logs = script, None, tempfile.TemporaryDirectory()
        self.out, self.err = (open(os.path.join(self.logs.name, name), "w+") for name in ("out", "err"))  # no pipe to fill
        self.proc = subprocess.Popen([PYTHON, f"jobs/{script}", *map(str, args)], cwd=REPO, env=env, stdout=self.out,
                                     stderr=self.err, text=True)

    def result(self, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        if self.done is None:
            try:
                self.proc.wait(timeout=timeout)
            finally:
                self.stop()
        if check and self.done.returncode != 0:
            raise AssertionError(f"{self.script} failed ({self.done.returncode}):\n{self.done.stdout[-3000:]}\n"
                                 f"{self.done.stderr[-3000:]}")
        return self.done

    def stop(self) -> None:
        """Kill it if it still runs (a fixture's teardown, when no test waited for it), and keep what it printed."""
        if self.done is not None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        printed = []
        for f in (self.out, self.err):
            f.seek(0)
            printed.append(f.read())
            f.close()
        self.logs.cleanup()
        self.done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, *printed)


def run_main(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``jobs/<script>``'s ``main()`` in this process, as its command line would, with ``env`` as the
    environment for the call; returns what ``run_job`` returns (status, stdout, stderr).

    For refusals: no interpreter, torch and Ray start-up per case. A refusal that comes after the job
    connects to Ray needs a cluster of the session's (``ray_cluster.env``'s RAY_ADDRESS, or ``--address``):
    without one the job would start an in-process Ray inside pytest. Each job keeps one ``run_job`` refusal
    for the real process's status."""
    module = importlib.import_module(f"jobs.{script.removesuffix('.py')}")
    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main([str(arg) for arg in args])
                code = 0
            except SystemExit as stop:
                code = stop.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# Ray's INFO lines as a job's console shows them: its Python loggers' ("\tINFO worker.py:2029 --"), its C++
# ones ("... I 28712 28712] logging.cc:303:"), Ray Train's controller and workers, Ray Data's plans and
# logged progress, and its tqdm bars sent from a worker.
RAY_INFO = re.compile(r"\tINFO \S+:\d+ --|\d I \d+ \d+\] \S+\.cc:\d+|Setting up process group|Reporting training result|"
                      r"worker group of size|Execution plan of Dataset|Running Dataset")


def ray_info_lines(text: str) -> list[str]:
    """The lines of a job's console that are Ray's INFO: none unless PIXELCNN_DEBUG=1."""
    return [line for line in text.splitlines() if RAY_INFO.search(line)]


@pytest.fixture
def local_ray_env(tmp_path_factory):
    """Env for a job that starts its own in-process Ray (no cluster)."""
    return base_env(RAY_TMPDIR=tempfile.mkdtemp(prefix="rl", dir="/tmp"))


def stop_job(script: str, *args, env: dict, ready, waiting_for: str, sig: int | None = signal.SIGINT, status: int = 130,
             line: str = "error: interrupted: rerun the same command to resume", timeout: float = 180,
             cwd: Path = REPO) -> str:
    """Start ``python <repo>/jobs/<script>`` in ``cwd``, send it ``sig`` once ``ready()`` (Ctrl-C by default;
    None: SIGKILL, as a lost laptop), and check how it stops: ``status`` and, last on stderr, ``line`` (a
    SIGKILL is not checked). Returns what it printed, stdout and stderr (files: an unread pipe could stall the
    job)."""
    with tempfile.TemporaryDirectory() as logs:
        out, err = Path(logs) / "out", Path(logs) / "err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            job = subprocess.Popen([PYTHON, str(REPO / "jobs" / script), *map(str, args)], cwd=cwd, env=env,
                                   stdout=stdout, stderr=stderr)
        try:
            deadline = time.time() + timeout
            while not ready():
                assert time.time() < deadline and job.poll() is None, \
                    f"no {waiting_for} appeared: " + err.read_text()[-2000:]
                time.sleep(0.1)
            if sig is None:
                job.kill()
            else:
                job.send_signal(sig)
            job.wait(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
        printed, errors = out.read_text(), err.read_text()
    if sig is not None:
        assert job.returncode == status, errors[-3000:]
        assert [x for x in errors.splitlines() if x.strip()][-1] == line, errors[-3000:]
    return printed + errors


def one_error_line(proc) -> str:
    """A refused job: exit status 2 and, last on stderr, one line that starts with 'error:'."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert line.startswith("error:"), proc.stderr[-2000:]
    return line


@pytest.fixture(scope="module")
def nodes(s3):
    """A real multi-node Ray cluster on loopback, as Ray's own node-failure tests build one: a head with no
    CPUs (like cluster.yaml's) and worker raylets added and killed by the test (``add``, ``kill``).

    The nodes start from this process's environment, which holds the S3 endpoint and credentials, as
    instance profiles give real nodes theirs."""
    from ray.cluster_utils import Cluster

    # A lost node is declared dead after 2 failed health checks 0.3 s apart (~0.6 s), not Ray's default 5 at 3 s: a
    # killed raylet fails a check at once, a busy one only after Ray's 10-s check timeout.
    env = base_env(**s3.env, RAY_TMPDIR=tempfile.mkdtemp(prefix="rn", dir="/tmp"), RAY_health_check_period_ms="300",
                   RAY_health_check_failure_threshold="2")
    os.makedirs(os.path.join(env["RAY_TMPDIR"], "ray"))  # where ray.cluster_utils notes the cluster's address
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        # No dashboard (~15 CPU-s a module), as ray_cluster.
        num_cpus=0, include_dashboard=False, node_ip_address="127.0.0.1", temp_dir=env["RAY_TMPDIR"]))

    class Nodes:
        address = cluster.address
        job_env = env
        workers: list = []

        def add(self, cpus: int = 1):
            node = cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
            self.workers.append(node)
            return node

        def kill(self, node) -> None:
            """SIGKILL every process of the node, as a lost machine (Ray's node-failure tests do so)."""
            cluster.remove_node(node, allow_graceful=False)
            self.workers.remove(node)

        def node_of(self, title: str):
            """The worker node running a process whose title names ``title`` (a Ray Train worker, an actor)."""
            return next((node for node in self.workers if self.runs(node, title)), None)

        def runs(self, node, title: str) -> bool:
            """Whether ``node`` runs a process whose title names ``title``."""
            procs = process_titles(cluster_pids(env["RAY_TMPDIR"]))
            raylet = node.all_processes["raylet"][0].process.pid
            return any(title in procs.get(pid, "") for pid in cluster_pids_of(raylet))

    try:
        yield Nodes()
    finally:
        cluster.shutdown()
        stop_processes(cluster_pids(env["RAY_TMPDIR"]))
        os.environ.clear()
        os.environ.update(saved)


def cluster_pids_of(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    procs = _processes()
    found = frontier = {pid}
    while frontier:
        frontier = {p for p, (ppid, _) in procs.items() if ppid in frontier} - found
        found = found | frontier
    return sorted(found)
