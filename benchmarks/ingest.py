"""Your own images into training, beside MNIST in memory: images/s decoded and delivered to one training
worker, and training images/s, from a local PNG folder, the same folder on S3 and Parquet, in one run.

    .venv/bin/python benchmarks/ingest.py                           # 4,000 MNIST PNGs, every source
    .venv/bin/python benchmarks/ingest.py --images 256 --steps 0    # cheap: no training jobs
    .venv/bin/python benchmarks/ingest.py --sources memory,folder --measures train   # the target alone
    .venv/bin/python benchmarks/ingest.py --images 256 --steps 3 --log-every 1 --no-streamed --train-sources folder
                                                                    # the cheapest run of every measure (the test's)

The dataset: the first --images MNIST training images as 28x28 grayscale PNGs in ten class folders
(``7/00042.png``), written by ``pixelcnn.images.encode_png`` (what the generation job writes); the same
PNG bytes in Parquet files of 2,048 rows (``image_png`` and ``label`` columns, one row group each, as the
generation job's files); and the folder uploaded to a moto S3 server that this script starts on
127.0.0.1 (fake credentials, loopback only; moto is a Python process on this machine's cores, so S3
here is slower and costs more CPU than the real service).

Three figures per source:

* decode: ``pixelcnn.images.read_range`` over the first --decode-images images, in this process (one
  core): the library's reader alone.
* deliver: the Ray Data dataset ``jobs/train.py`` builds (``jobs.datasets.read_images``, training split)
  consumed as one training worker does, in this process's in-process Ray: "in memory" materialises it and
  gathers it whole (the path data under --data-in-memory-gb takes), "streamed" iterates
  ``streaming_split(1)`` in batches of 64 with the worker's local shuffle (the path larger data takes).
  The scan ``jobs/train.py`` runs first (one more pass over the source) is timed apart. MNIST in memory:
  ``load_dataset`` of the training split, and one epoch of ``InMemoryBatches``.
* train: ``jobs/train.py`` itself on each source with the ``make train`` model (PixelCNN hidden 32,
  4 blocks, batch 64, lr 2e-3), --steps steps, one worker, in-process Ray, as a subprocess. Its
  training images/s is wall clock: images between its progress line at step --log-every and the one at
  the last step, over the time between their arrival (so waiting for data counts; the job's own
  ``images_per_s`` metric times the steps alone, and is given beside it). MNIST in memory runs first and
  last; ratios are to the mean of those two, and their spread shows how much the machine drifted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pixelcnn.images import encode_png  # noqa: E402
from pixelcnn import load_dataset  # noqa: E402
from pixelcnn.batches import InMemoryBatches  # noqa: E402
from pixelcnn.images import ImageOptions, find_images, read_range  # noqa: E402

SOURCES = ("memory", "folder", "s3", "parquet")
BUCKET = "ingest-bench"
PARQUET_ROWS = 2048
# The `make train` recipe (Makefile), less what does not bear on speed (epochs: --max-steps stops it).
TRAIN_FLAGS = ["--hidden", "32", "--blocks", "4", "--batch-size", "64", "--lr", "2e-3", "--grid-samples", "0"]
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) \(")
# Ray Train's controller names the worker's resources; Ray gives a worker OMP_NUM_THREADS = its CPUs, which
# torch takes as its thread count.
WORKER_LINE = re.compile(r"training worker group of size 1 with the following resources: \[\{'CPU': ([\d.]+)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4000, help="MNIST training images written as PNGs")
    p.add_argument("--decode-images", type=int, default=1000, help="images the one-process decode figure reads")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    p.add_argument("--measures", default="decode,deliver,train", help="comma-separated, of decode, deliver, train")
    p.add_argument("--train-sources", help="the sources the training jobs read (default: --sources)")
    p.add_argument("--steps", type=int, default=50, help="training steps per job (0: no training jobs); keep it "
                   "below one epoch (train images / 64), so no epoch-end report falls inside the timed window")
    p.add_argument("--log-every", type=int, default=5, help="the jobs' progress lines: the timed window starts at the first")
    p.add_argument("--no-streamed", action="store_true", help="train own images only as held in memory (the default "
                   "path for data this small), not also streamed (--data-in-memory-gb 0)")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "mnist"), help="MNIST's torchvision root")
    p.add_argument("--json", help="also write every figure to this file")
    args = p.parse_args()
    sources = [s for s in args.sources.split(",") if s]
    train_sources = [s for s in args.train_sources.split(",") if s] if args.train_sources else sources
    unknown = set(sources + train_sources) - set(SOURCES)
    if unknown:
        p.error(f"unknown sources {', '.join(sorted(unknown))}: choose from {', '.join(SOURCES)}")
    measures = [m for m in args.measures.split(",") if m]
    if set(measures) - {"decode", "deliver", "train"}:
        p.error(f"unknown measures {', '.join(sorted(set(measures) - {'decode', 'deliver', 'train'}))}")
    if not args.steps and "train" in measures:
        measures.remove("train")
    if args.steps and args.steps <= args.log_every:
        p.error("--steps must exceed --log-every (the timed window runs from the first progress line to the last)")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ingest-", dir="/tmp") as tmp:
        mnist = load_dataset("mnist", args.data_dir)
        if args.images > len(mnist):
            p.error(f"--images {args.images} exceeds MNIST's {len(mnist)} training images")
        folder, parquet = write_dataset(mnist, args.images, tmp)
        print(f"dataset: {args.images} MNIST PNGs in 10 class folders ({folder_bytes(folder) / 1e6:.1f} MB), the same "
              f"bytes in {-(-args.images // PARQUET_ROWS)} Parquet files; {torch.get_num_threads()} torch threads, "
              f"{os.cpu_count()} CPUs", flush=True)
        server = start_moto(tmp) if "s3" in sources + train_sources else None
        try:
            uris = {"folder": folder, "parquet": parquet}
            if server is not None:
                uris["s3"] = upload(folder, f"{BUCKET}/png")
            if "decode" in measures:
                rows += decode_rates(sources, uris, mnist, args)
            if "deliver" in measures:
                rows += deliver_rates(sources, uris, mnist, args)
            if "train" in measures:
                rows += train_rates(train_sources, uris, args, tmp)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    summarise(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


# --- the dataset --------------------------------------------------------------------------------


def write_dataset(mnist, count: int, tmp: str) -> tuple[str, str]:
    images, labels = mnist.images[:count].numpy(), mnist.labels[:count].numpy()
    pngs = [encode_png(image) for image in images]
    folder, parquet = os.path.join(tmp, "png"), os.path.join(tmp, "parquet")
    for digit in range(10):
        os.makedirs(os.path.join(folder, str(digit)), exist_ok=True)
    for k, (png, label) in enumerate(zip(pngs, labels)):
        with open(os.path.join(folder, str(int(label)), f"{k:05d}.png"), "wb") as f:
            f.write(png)
    os.makedirs(parquet)
    for part, start in enumerate(range(0, count, PARQUET_ROWS)):
        table = pa.table({"image_png": pa.array(pngs[start:start + PARQUET_ROWS], pa.binary()),
                          "label": pa.array(labels[start:start + PARQUET_ROWS].astype(np.int64))})
        pq.write_table(table, os.path.join(parquet, f"part-{part:05d}.parquet"), row_group_size=PARQUET_ROWS)
    return folder, parquet


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def start_moto(tmp: str) -> subprocess.Popen:
    """moto_server on 127.0.0.1 with fake credentials in this process's environment, which the in-process
    Ray's workers and the training jobs inherit (as tests/conftest.py's ``s3`` fixture sets them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                sys.exit("moto_server did not start")
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_EC2_METADATA_DISABLED="true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    return server


def s3_filesystem() -> pafs.S3FileSystem:
    from jobs.storage import S3Settings

    return S3Settings.from_env().filesystem()


def upload(folder: str, path: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=path.split("/")[0])
    started = time.perf_counter()
    pafs.copy_files(folder, path, destination_filesystem=s3_filesystem(), use_threads=True)
    print(f"uploaded the folder to s3://{path} in {time.perf_counter() - started:.1f} s "
          f"(moto on {os.environ['AWS_ENDPOINT_URL']})", flush=True)
    return f"s3://{path}"


# --- decode: the library's reader in this process ----------------------------------------------


def decode_rates(sources: list, uris: dict, mnist, args) -> list[dict]:
    rows = []
    for name in sources:
        if name == "memory":
            started = time.perf_counter()
            data = load_dataset("mnist", args.data_dir)
            seconds = time.perf_counter() - started
            count = len(data)
            how = "load_dataset('mnist'): the idx file, whole"
        else:
            fs = s3_filesystem() if name == "s3" else pafs.LocalFileSystem()
            source = find_images(uris[name], fs if name == "s3" else None)
            count = min(args.decode_images, len(source))
            started = time.perf_counter()
            rows_read = read_range(source, fs, 0, count, ImageOptions())
            seconds = time.perf_counter() - started
            assert len(rows_read.index) == count and rows_read.images.shape[1:] == (1, 28, 28)
            how = f"read_range, {count} images, 1 process"
        rows.append({"measure": "decode", "source": name, "images": count, "seconds": seconds,
                     "images_per_s": count / seconds, "how": how})
        print(f"decode {name}: {count / seconds:,.0f} images/s ({how})", flush=True)
    return rows


# --- deliver: Ray Data to one training worker's iterator ---------------------------------------


def deliver_rates(sources: list, uris: dict, mnist, args) -> list[dict]:
    rows = []
    if "memory" in sources:
        data = load_dataset("mnist", args.data_dir, subset=args.images)
        batches = InMemoryBatches(data, 64, 0, 0, 1, "cpu")
        started = time.perf_counter()
        count = sum(len(b.levels) for b in batches.epoch(0))
        seconds = time.perf_counter() - started
        rows.append({"measure": "deliver", "source": "memory", "path": "in memory", "images": count,
                     "seconds": seconds, "images_per_s": count / seconds})
        print(f"deliver memory: {count / seconds:,.0f} images/s (one epoch of InMemoryBatches, batch 64)", flush=True)
    own = [s for s in sources if s != "memory"]
    if not own:
        return rows
    from jobs.cluster import init_ray, shutdown_ray
    from jobs.datasets import find_source, gather, read_images, scan

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ri", dir="/tmp"))  # short: Unix sockets
    init_ray(None)
    try:
        import ray

        # Warm-up: start the read tasks' worker processes and import what they run (torch, pyarrow, the
        # reader) once, so the first source's scan does not pay for it (a job pays it once, in its scan).
        ray.data.range(8, override_num_blocks=4).map_batches(_warm_up, num_cpus=0.5).take_all()
        for name in own:
            options = ImageOptions()
            source, s3 = find_source(uris[name], None, options)
            started = time.perf_counter()
            found = scan(source, s3, options)
            scan_s = time.perf_counter() - started
            train = found.images - found.test
            rows.append({"measure": "scan", "source": name, "images": found.images, "seconds": scan_s,
                         "images_per_s": found.images / scan_s})
            started = time.perf_counter()
            arrays = gather(read_images(source, s3, options, split="train").materialize().iterator())
            seconds = time.perf_counter() - started
            assert len(arrays["index"]) == train
            rows.append({"measure": "deliver", "source": name, "path": "in memory", "images": train,
                         "seconds": seconds, "images_per_s": train / seconds})
            started = time.perf_counter()
            split = read_images(source, s3, options, split="train").randomize_block_order().streaming_split(1, equal=True)[0]
            count = 0
            for batch in split.iter_torch_batches(batch_size=64, drop_last=True, local_shuffle_buffer_size=256,
                                                  local_shuffle_seed=0):
                count += len(batch["image"])
            streamed_s = time.perf_counter() - started
            rows.append({"measure": "deliver", "source": name, "path": "streamed", "images": count,
                         "seconds": streamed_s, "images_per_s": count / streamed_s})
            print(f"deliver {name}: scan {found.images / scan_s:,.0f} images/s; in memory {train / seconds:,.0f} "
                  f"images/s; streamed {count / streamed_s:,.0f} images/s", flush=True)
    finally:
        shutdown_ray()
    return rows


def _warm_up(batch):
    import jobs.datasets  # noqa: F401  (torch, pyarrow, PIL and the reader)

    time.sleep(0.5)  # long enough that the tasks run on more than one worker process
    return batch


# --- train: jobs/train.py on each source --------------------------------------------------------


def train_rates(sources: list, uris: dict, args, tmp: str) -> list[dict]:
    runs = []
    for name in sources:
        if name == "memory":
            continue
        runs.append((name, "in memory"))
        if not args.no_streamed:
            runs.append((name, "streamed"))
    if "memory" in sources:
        # First and last: the reference, and how far the machine drifted meanwhile. The streamed path's
        # trainer gets 1 CPU (jobs/train.py leaves the other to the read tasks), so 1 torch thread: MNIST in
        # memory on 1 CPU too, the same trainer with only the data path changed.
        refs = [("memory", "in memory")] + ([("memory", "in memory, 1 CPU")] if not args.no_streamed else [])
        runs = refs + runs + refs[::-1]
    rows = []
    for k, (name, path) in enumerate(runs):
        row = train_job(name, path, uris, args, os.path.join(tmp, "runs"), f"run{k}")
        rows.append(row)
        print(f"train {name} ({path}): {row['images_per_s']:.1f} images/s (steps {row['first_step']}-{row['last_step']}, "
              f"wall clock); its metric {row['metric_images_per_s']:.1f}; {row['images_per_cpu_s']:.1f} images per CPU "
              f"second; trainer {row['trainer_cpus'] or '?'} CPUs; load {row['load_average'][0]:.1f}-"
              f"{row['load_average'][1]:.1f}; first progress line after {row['first_line_s']:.1f} s, job "
              f"{row['job_s']:.1f} s", flush=True)
    return rows


def train_job(name: str, path: str, uris: dict, args, storage: str, run: str) -> dict:
    train_images = args.images - round(0.05 * args.images)  # about: the hashed test split holds ~5%
    if name == "memory":
        data = ["--dataset", "mnist", "--data-dir", os.path.abspath(args.data_dir), "--subset", str(train_images),
                "--test-subset", str(args.images - train_images)] + (["--cpus-per-worker", "1"] if "1 CPU" in path else [])
    else:
        data = ["--dataset", uris[name]] + (["--data-in-memory-gb", "0"] if path == "streamed" else [])
    cmd = [sys.executable, os.path.join(REPO, "jobs", "train.py"), *data, *TRAIN_FLAGS, "--max-steps", str(args.steps),
           "--log-every", str(args.log_every), "--storage", storage, "--name", run]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PYTHONUNBUFFERED="1", RAY_TMPDIR=tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    started = time.perf_counter()
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, steps = [], []  # steps: (step, arrival time, CPU seconds of the job's processes, 1-min load average)
    cpus = None
    for line in job.stdout:
        lines.append(line)
        match = STEP_LINE.search(line)
        if match:
            steps.append((int(match.group(1)), time.perf_counter(), tree_cpu_seconds(process_table(), job.pid),
                          os.getloadavg()[0]))
        worker = WORKER_LINE.search(line)
        if worker:
            cpus = float(worker.group(1))
    job.wait()
    job_s = time.perf_counter() - started
    if job.returncode or len(steps) < 2:
        sys.exit(f"jobs/train.py failed on {name} ({path}):\n{''.join(lines[-40:])}")
    metrics = json.loads(lines[-1])
    (first, t0, cpu0, load0), (last, t1, cpu1, load1) = steps[0], steps[-1]
    images = (last - first) * 64
    return {"measure": "train", "source": name, "path": path, "steps": args.steps, "first_step": first, "last_step": last,
            "images_per_s": images / (t1 - t0), "metric_images_per_s": metrics["images_per_s"],
            "images_per_cpu_s": images / max(1e-9, cpu1 - cpu0), "cpu_s": cpu1 - cpu0, "window_s": t1 - t0,
            "trainer_cpus": cpus, "load_average": [load0, load1], "first_line_s": t0 - started, "job_s": job_s}


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds of it and its reaped children, its title), from /proc."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        procs[int(entry)] = (int(fields[1]), sum(int(v) for v in fields[11:15]) / CLOCK_TICKS, title)
    return procs


def descendants(procs: dict, pid: int) -> set[int]:
    found = frontier = {pid}
    while frontier:
        frontier = {p for p, (ppid, _, _) in procs.items() if ppid in frontier} - found
        found = found | frontier
    return found


def tree_cpu_seconds(procs: dict, pid: int) -> float:
    """CPU seconds used so far by the job: its driver, and the in-process Ray it started (GCS, raylet, the
    trainer, read tasks' workers: all its descendants)."""
    return sum(procs[p][1] for p in descendants(procs, pid) if p in procs)


# --- the summary ---------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> None:
    """Each own-images run against MNIST in memory (the mean of its first and last run; streamed runs also
    against MNIST on the same 1 CPU): wall-clock images/s, and images per CPU second of the job's processes
    (less sensitive to what else runs on the machine)."""
    train = [r for r in rows if r["measure"] == "train"]
    if not train:
        return
    print("\ntraining (steady state): wall-clock images/s, images per CPU second")
    references = {}
    for path in ("in memory", "in memory, 1 CPU"):
        runs = [r for r in train if r["source"] == "memory" and r["path"] == path]
        if not runs:
            continue
        wall = statistics.mean(r["images_per_s"] for r in runs)
        cpu = statistics.mean(r["images_per_cpu_s"] for r in runs)
        references[path] = (wall, cpu)
        spread = 100 * (max(r["images_per_s"] for r in runs) - min(r["images_per_s"] for r in runs)) / wall
        rates = ", ".join(f"{r['images_per_s']:.1f}" for r in runs)
        per_cpu = ", ".join(f"{r['images_per_cpu_s']:.1f}" for r in runs)
        print(f"  memory ({path}): {rates} (first, last run: mean {wall:.1f}, spread {spread:.0f}%); per CPU second "
              f"{per_cpu}")
    for r in train:
        if r["source"] == "memory":
            continue
        text = f"  {r['source']} ({r['path']}, trainer {r['trainer_cpus'] or '?'} CPUs): {r['images_per_s']:.1f}, " \
               f"{r['images_per_cpu_s']:.1f} per CPU second"
        for path, (wall, cpu) in references.items():
            if path == "in memory" or r["path"] == "streamed":
                key = "memory" if path == "in memory" else "memory_1cpu"
                r[f"ratio_to_{key}"], r[f"cpu_ratio_to_{key}"] = r["images_per_s"] / wall, r["images_per_cpu_s"] / cpu
                text += f"; to memory ({path}) {r[f'ratio_to_{key}']:.2f}, per CPU {r[f'cpu_ratio_to_{key}']:.2f}"
        print(text + f"; first progress line after {r['first_line_s']:.1f} s")


if __name__ == "__main__":
    main()
