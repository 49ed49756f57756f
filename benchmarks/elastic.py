"""What losing a node costs an elastic training run: seconds from the node kill to the first step at the
smaller size, and the steps lost (redone since the last checkpoint), for a few --checkpoint-every values.

    .venv/bin/python benchmarks/elastic.py --checkpoint-every 10,50

A real multi-node Ray cluster on loopback (ray.cluster_utils.Cluster: a head with no CPUs and two worker
nodes of one CPU each, as the tests build one), jobs/train.py with --num-workers 2 --min-workers 1 on
MNIST, and the node of one worker killed outright (SIGKILL of every process of that node) once the run
is well past a checkpoint. The time is read off the job's own progress lines (--log-every 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint-every", default="10,50", help="comma-separated values to measure")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "mnist"))
    p.add_argument("--start-timeout", default="10", help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for the run (Ray's default: 60)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="re", dir="/tmp")
    os.makedirs(os.path.join(tmp, "ray"))
    os.environ.update(RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
                      RAY_USAGE_STATS_ENABLED="0")
    from ray.cluster_utils import Cluster

    rows = []
    for every in map(int, args.checkpoint_every.split(",")):
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, include_dashboard=False, node_ip_address="127.0.0.1", temp_dir=tmp))
        nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
        try:
            rows.append(measure(cluster, nodes, every, args, tmp))
        finally:
            cluster.shutdown()
        print(json.dumps(rows[-1]), flush=True)
    print("\n| --checkpoint-every | step at the kill | resumed from | steps lost | kill -> first step at 1 worker (s) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['checkpoint_every']} | {r['step_at_kill']} | {r['resumed_from']} | {r['steps_lost']} | "
              f"{r['seconds_to_first_step']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def measure(cluster, nodes, every: int, args, tmp: str) -> dict:
    log = os.path.join(tmp, f"train-{every}.log")
    cmd = [sys.executable, "jobs/train.py", "--dataset", "mnist", "--data-dir", args.data_dir, "--subset", "6400",
           "--test-subset", "64", "--hidden", "8", "--blocks", "1", "--batch-size", "64", "--epochs", "20",
           "--grid-samples", "0", "--log-every", "1", "--checkpoint-every", str(every), "--num-workers", "2",
           "--min-workers", "1", "--cpus-per-worker", "1", "--resize-interval", "5",
           "--storage", os.path.join(tmp, "runs"), "--name", f"every-{every}", "--address", cluster.address]
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": args.start_timeout, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        # Kill half-way between two checkpoints, past the first one: the steps since it are what is lost.
        kill_at = every + every // 2
        wait(lambda: last_step(log) >= kill_at, job, "the kill point")
        victim = node_running(nodes, "RayTrainWorker", tmp)
        step = last_step(log)
        killed = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        wait(lambda: re.search(r"resuming from step \d+ with 1 worker", open(log).read()), job, "the resume")
        resumed = int(re.search(r"resuming from step (\d+) with 1 worker", open(log).read())[1])
        wait(lambda: any(s > resumed for s in steps_after_resume(log)), job, "a step at one worker")
        first = time.time() - killed
    finally:
        job.kill()
        job.wait()
    return {"checkpoint_every": every, "step_at_kill": step, "resumed_from": resumed, "steps_lost": step - resumed,
            "seconds_to_first_step": first, "start_timeout_s": float(args.start_timeout)}


def wait(condition, job, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        if job.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{what} did not happen")
        time.sleep(0.05)


STEP = re.compile(r"step (\d+)/\d+ \(")


def last_step(log: str) -> int:
    steps = STEP.findall(open(log).read())
    return int(steps[-1]) if steps else 0


def steps_after_resume(log: str) -> list[int]:
    text = open(log).read().split("with 1 worker", 1)
    return [int(s) for s in STEP.findall(text[1])] if len(text) > 1 else []


def node_running(nodes, title: str, tmp: str):
    """The worker node whose raylet has a child process titled ``title``."""
    for node in nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(raylet)], capture_output=True, text=True).stdout
        if title in children:
            return node
    raise SystemExit(f"no node runs a {title}")


if __name__ == "__main__":
    main()
