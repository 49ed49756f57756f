"""Token authentication, on loopback: a Ray cluster with ``RAY_AUTH_MODE=token`` runs both jobs for a
submitter that has the token and refuses every other one, and the token shows up in no output or log.

Also cluster.yaml's start commands, run as Ray's launcher runs them on a node (its own quoting, through
``bash --login -c -i`` and ``docker exec``'s ``/bin/bash -c``), against Secrets Manager on loopback (moto):
they read the token into ``ray start``'s environment, and start nothing without one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (MNIST_ROOT, PYTHON, REPO, base_env, cluster_pids, free_port, randomize, s3_keys, start_moto,
                      stop_processes)

pytestmark = pytest.mark.slow

RAY = str(Path(PYTHON).parent / "ray")
SECRET_NAME = "pixelcnn-ray-auth-token"  # "<stack name>-ray-auth-token" for the runbook's stack "pixelcnn"
# tests/test_train_job.py's SMALL: a tiny model on 256 MNIST images.
SMALL = [
    "--dataset", "mnist", "--data-dir", MNIST_ROOT, "--subset", 256, "--test-subset", 64, "--hidden", 8,
    "--blocks", 1, "--batch-size", 32, "--epochs", 1, "--grid-samples", 4, "--log-every", 2,
]


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_hex(32)  # what `ray get-auth-token --generate` makes: 64 hex digits


@pytest.fixture(scope="module")
def auth_cluster(s3, token):
    """``ray start --head`` on 127.0.0.1 with token authentication on; stopped by PID (never ``ray stop``).

    conftest's ray_cluster, except for RAY_AUTH_MODE=token and the token in ``ray start``'s environment,
    as cluster.yaml's start commands give it on a node.
    """
    temp_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: Unix socket paths
    port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
    env = base_env(**s3.env, PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", ""),
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    cmd = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", "--include-dashboard=true", f"--temp-dir={temp_dir}", "--num-cpus=4",
        "--num-gpus=0", "--disable-usage-stats",
        # Ports of our own where Ray's defaults are fixed (52365, 10001): another test cluster on this
        # machine may hold those, and Ray's job submission needs this node's dashboard agent.
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert token not in proc.stdout + proc.stderr
        yield type("AuthCluster", (), {
            "address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "temp_dir": temp_dir,
            "home": env["HOME"],
        })
    finally:
        stop_processes(cluster_pids(temp_dir))
        for folder in (temp_dir, env["HOME"]):
            shutil.rmtree(folder, ignore_errors=True)


def submitter_env(tmp_path: Path, **auth) -> dict:
    """A user's shell: no cluster settings, no AWS credentials, an empty home (no ~/.ray/auth_token)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = base_env(HOME=str(home), PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", ""))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    env.update(auth)
    return env


def submit(cluster, env: dict, *entrypoint) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--", "python", *entrypoint]
    return subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def api(cluster, path: str, token: str):
    """GET the dashboard's HTTP API with the token (urllib: this process's own Ray stays untouched)."""
    request = urllib.request.Request(cluster.dashboard + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def submitted_entrypoints(cluster, token: str) -> list[str]:
    return [job["entrypoint"] for job in json.loads(api(cluster, "/api/jobs/", token))]


@pytest.fixture(scope="module")
def tiny_checkpoint(s3, tmp_path_factory):
    """A small unconditional model in S3 (tests/test_generate_job.py's "plain")."""
    from pixelcnn import PixelCNN
    from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint

    torch.manual_seed(0)
    model = randomize(PixelCNN(hidden=8, blocks=1, image_size=(12, 10), num_classes=0), std=0.2)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, checkpoint_dict(model, step=1, dataset="test"))
    s3.client.upload_file(str(path), "pixelcnn", "models/auth/model.pt")
    return "s3://pixelcnn/models/auth"


# --------------------------------------------------------------------------- jobs through `ray job submit`


def test_both_jobs_run_for_a_submitter_with_the_token(auth_cluster, s3, token, tiny_checkpoint, tmp_path):
    env = submitter_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)

    # Submitted at once, as two users would: each job mostly waits on Ray's start-up, and the cluster has room.
    with ThreadPoolExecutor(2) as pool:
        training = pool.submit(submit, auth_cluster, env, "jobs/train.py", *SMALL, "--max-steps", 2, "--storage",
                               "s3://pixelcnn/runs", "--name", "auth-train")
        generation = pool.submit(submit, auth_cluster, env, "jobs/generate.py", "--checkpoint", tiny_checkpoint,
                                 "--num-samples", 8, "--output", "s3://pixelcnn/samples/auth", "--rows-per-file", 8,
                                 "--cpus-per-actor", 0.5)  # the default, 3 of the cluster's 4 CPUs, would wait for the trainer
    train, generate = training.result(), generation.result()
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert '"test_bits_per_dim"' in train.stdout
    assert "runs/auth-train/model.pt" in s3_keys(s3.client, "pixelcnn", "runs/auth-train/")

    assert generate.returncode == 0, generate.stdout[-3000:] + generate.stderr[-3000:]
    assert "generated 8 samples" in generate.stdout
    assert [k for k in s3_keys(s3.client, "pixelcnn", "samples/auth/") if k.endswith(".parquet")]

    # The token is in neither submitter's output nor in the jobs' logs that the Jobs API serves.
    for proc in (train, generate):
        assert token not in proc.stdout + proc.stderr
    jobs = json.loads(api(auth_cluster, "/api/jobs/", token))
    succeeded = [job["entrypoint"] for job in jobs if job["status"] == "SUCCEEDED"]
    assert any("--name auth-train" in e for e in succeeded) and any("samples/auth" in e for e in succeeded), jobs
    for job in jobs:
        logs = json.loads(api(auth_cluster, f"/api/jobs/{job['submission_id']}/logs", token))["logs"]
        assert logs and token not in logs


# Each way of getting it wrong: (name, the submitter's auth variables, what the refusal says).
REFUSED = [
    # Ray's default client (RAY_AUTH_MODE unset) sends no token: the Jobs API answers 401.
    ("no-token", {}, "Missing authentication token"),
    # RAY_AUTH_TOKEN alone is not enough: without RAY_AUTH_MODE=token the client does not send it.
    ("token-without-mode", {"RAY_AUTH_TOKEN": "TOKEN"}, "Missing authentication token"),
    # Token mode on, no token anywhere: the client refuses before sending anything.
    ("mode-without-token", {"RAY_AUTH_MODE": "token"}, "couldn't find an authentication token"),
    # A wrong token: the Jobs API answers 403.
    ("wrong-token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "WRONG"}, "Invalid authentication token"),
]


@pytest.mark.parametrize("name, auth, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_submit_without_the_right_token_is_refused_and_never_runs(auth_cluster, s3, token, tmp_path, name, auth,
                                                                    message):
    values = {"TOKEN": token, "WRONG": secrets.token_hex(32)}
    env = submitter_env(tmp_path, **{k: values.get(v, v) for k, v in auth.items()})
    prefix = f"runs/refused-{name}/"
    proc = submit(auth_cluster, env, "jobs/train.py", *SMALL, "--max-steps", 2, "--storage", "s3://pixelcnn/runs",
                  "--name", f"refused-{name}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert message in out and "authentication" in out.lower(), out[-3000:]
    assert token not in out and values["WRONG"] not in out
    # The job never ran: the cluster has no such job, and nothing appeared under its prefix.
    time.sleep(1)
    assert not [e for e in submitted_entrypoints(auth_cluster, token) if f"refused-{name}" in e]
    assert s3_keys(s3.client, "pixelcnn", prefix) == []


DIRECT = [  # (what the job's environment holds, what its one line says)
    ("no-mode", {}, "requires token authentication and this job sent no token: set RAY_AUTH_MODE=token"),
    ("no-token", {"RAY_AUTH_MODE": "token"}, "requires an authentication token and none was found"),
    ("wrong-token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "WRONG"},
     "refused the authentication token from RAY_AUTH_TOKEN: it is not the cluster's token"),
]


@pytest.mark.parametrize("name, auth, message", DIRECT, ids=[d[0] for d in DIRECT])
def test_a_job_connecting_without_the_right_token_is_one_line(auth_cluster, s3, token, tiny_checkpoint, tmp_path,
                                                               name, auth, message):
    """A driver run with --address (not through `ray job submit`) against a cluster with token auth: one
    error line saying which token was missing or refused, never the token, nothing written; asked once,
    not after Ray's ~20 s of retries (each says "Failed to get cluster ID")."""
    wrong = secrets.token_hex(32)
    env = {**submitter_env(tmp_path, **{k: wrong if v == "WRONG" else v for k, v in auth.items()}), **s3.env}
    proc = subprocess.run([PYTHON, "jobs/generate.py", "--checkpoint", tiny_checkpoint, "--num-samples", "4", "--output",
                           f"s3://pixelcnn/auth-direct/{name}", "--address", auth_cluster.address],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    line = [x for x in proc.stderr.splitlines() if x.strip()][-1]
    assert proc.returncode == 2 and line.startswith("error: ") and message in line, proc.stderr[-3000:]
    assert token not in proc.stdout + proc.stderr and wrong not in proc.stdout + proc.stderr
    assert proc.stderr.count("Failed to get cluster ID") <= 1, proc.stderr[-3000:]
    assert not s3_keys(s3.client, "pixelcnn", f"auth-direct/{name}/")


def test_the_token_is_in_no_file_the_cluster_wrote(auth_cluster, token):
    """Ray keeps the token in its processes' environment only: no log, session file or job's working
    directory under the cluster's temp dir holds it, nor ~/.ray/auth_token (the home it started with)."""
    # Run last in this module: by now both jobs have run and the refused submits have been logged.
    files = [p for p in Path(auth_cluster.temp_dir).rglob("*") if stat.S_ISREG(p.lstat().st_mode)]
    assert any(p.name.startswith("job-driver-") for p in files), "no job driver log to check"
    holding = [str(p) for p in files if token.encode() in p.read_bytes()]
    assert holding == []
    assert not (Path(auth_cluster.home) / ".ray").exists()


# --------------------------------------------------------------------------- cluster.yaml's start commands


def launcher_line(cmd: str, home: str, env_vars: dict | None = None) -> str:
    """The line Ray's launcher hands to SSH for ``cmd`` in the container, less ``docker exec -it <name>``:
    RAY_HEAD_IP exports, ``~/`` expanded to the container's home, ``bash --login -c -i 'source ~/.bashrc;
    ...'``, then ``/bin/bash -c '...'`` (Ray's own functions, so the quoting is the one a node sees)."""
    from ray.autoscaler._private.command_runner import _with_interactive
    from ray.autoscaler._private.docker import with_docker_exec
    from ray.autoscaler._private.util import with_envs

    if env_vars:
        cmd = with_envs([cmd], env_vars)[0]
    cmd = " ".join(_with_interactive(cmd.replace("~/", f"{home}/")))
    line = with_docker_exec([cmd], container_name="ray_container", docker_cmd="docker", with_interactive=True)[0]
    prefix = "docker exec -it  ray_container "
    assert line.startswith(prefix), line
    return line[len(prefix):]


@pytest.fixture(scope="module")
def secrets_manager():
    """AWS Secrets Manager on loopback: moto's emulation (an emulator is what there is for it here)."""
    server, env = start_moto()
    try:
        yield env
    finally:
        stop_processes([server.pid])


@pytest.fixture
def node(tmp_path, secrets_manager):
    """A stand-in for a node's container: its own home, a `ray` that records how it was started, the
    project's Python (with boto3), and Secrets Manager (moto, on loopback) holding the token."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    record = tmp_path / "ray-start.json"
    fake_ray = bin_dir / "ray"
    fake_ray.write_text(
        f"#!{PYTHON}\n"
        "import hashlib, json, os, sys\n"
        "if sys.argv[1:2] == ['start']:\n"
        "    token = os.environ.get('RAY_AUTH_TOKEN', '')\n"
        f"    json.dump({{'args': sys.argv[1:], 'mode': os.environ.get('RAY_AUTH_MODE'),\n"
        "               'token_sha256': hashlib.sha256(token.encode()).hexdigest() if token else None},\n"
        f"              open({str(record)!r}, 'w'))\n"
    )
    fake_ray.chmod(0o755)
    # A login shell resets PATH from /etc/profile; the Ray image's ~/.bashrc puts its Python first again.
    (home / ".bashrc").write_text(f'export PATH="{bin_dir}:{os.path.dirname(PYTHON)}:$PATH"\n')
    env = {k: v for k, v in base_env(**secrets_manager).items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    # On EC2, boto3 takes the region from the instance metadata; here, from the environment.
    env.update(HOME=str(home), AWS_DEFAULT_REGION=secrets_manager["AWS_REGION"])
    secret = secrets.token_urlsafe(48)
    import boto3

    client = boto3.client("secretsmanager", endpoint_url=secrets_manager["AWS_ENDPOINT_URL"],
                          region_name=secrets_manager["AWS_REGION"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    try:
        client.delete_secret(SecretId=SECRET_NAME, ForceDeleteWithoutRecovery=True)
    except client.exceptions.ResourceNotFoundException:
        pass
    client.create_secret(Name=SECRET_NAME, SecretString=secret)

    def run(cmd: str, env_vars=None, **extra_env) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", launcher_line(cmd, str(home), env_vars)], env={**env, **extra_env},
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    return type("Node", (), {"run": staticmethod(run), "record": record, "secret": secret, "home": home})


def start_command(config: dict, key: str) -> str:
    (cmd,) = [c for c in config[key] if "ray start" in c]
    return cmd


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_read_the_token_into_ray_start(node, key):
    import hashlib

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    proc = node.run(start_command(config, key), env_vars={"RAY_HEAD_IP": "127.0.0.1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    started = json.loads(node.record.read_text())
    assert started["mode"] == "token"
    assert started["token_sha256"] == hashlib.sha256(node.secret.encode()).hexdigest()
    assert node.secret not in proc.stdout + proc.stderr
    if key == "head_start_ray_commands":
        assert "--dashboard-host=127.0.0.1" in started["args"]
    else:
        assert "--address=127.0.0.1:6379" in started["args"]


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_start_nothing_without_the_token(node, key):
    """No secret in reach (here: another region): the command fails, and Ray is never started without auth."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    proc = node.run(start_command(config, key), env_vars={"RAY_HEAD_IP": "127.0.0.1"},
                    AWS_DEFAULT_REGION="eu-north-1")
    assert proc.returncode != 0
    assert not node.record.exists()


def test_launcher_shells_on_a_node_get_the_token(node):
    """The setup command's ~/.bashrc line gives `ray exec`/`ray attach` shells the token, added once, and
    ~/.bashrc itself holds the fetch, not the token."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (line,) = [c for c in config["setup_commands"] if ".bashrc" in c]
    for _ in range(2):  # `ray up` reruns setup commands on an existing node
        proc = node.run(line)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bashrc = (node.home / ".bashrc").read_text()
    assert bashrc.count(SECRET_NAME) == 1 and node.secret not in bashrc
    probe = "python -c 'import os, hashlib; print(os.environ[\"RAY_AUTH_MODE\"], hashlib.sha256(os.environ[\"RAY_AUTH_TOKEN\"].encode()).hexdigest())'"
    proc = node.run(probe)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import hashlib

    assert proc.stdout.split()[-2:] == ["token", hashlib.sha256(node.secret.encode()).hexdigest()]
