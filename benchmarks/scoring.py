"""Images/s of the whole scoring job vs the bare batched forward pass, on the same machine, in one run.

    .venv/bin/python benchmarks/scoring.py                                   # CPU: MNIST's 10,000 test images
    .venv/bin/python benchmarks/scoring.py --source folder --num-images 4096 # the same, from a folder of PNGs
    .venv/bin/python benchmarks/scoring.py --gpus-per-actor 1 --num-actors 1 --batch-size 1024 \\
        --hidden 128 --blocks 15                                             # one GPU (not yet run on one)

The model is a fresh PixelCNN of --hidden/--blocks (default the ``make train`` size, 32 and 4; seeded),
or --checkpoint. The bare loop is ``pixelcnn.likelihood.score`` in this process over the same images in
batches of --batch-size, with every CPU thread (or the GPU): the images already in memory, nothing
written. The job is ``jobs/score.py`` with an in-process Ray, as a subprocess: Ray's start-up, loading
or listing and scanning the images, read tasks, actors, row building and Parquet writes all counted.

Two job figures: its own summary's images/s (from the start of its pipeline to the last file written:
Ray's start-up and the scan before it are left out), and images over the whole process's wall clock
(interpreter, imports and all). The bare loop runs half its batches before the job and half after it,
so the two bracket the job in time on a shared machine; its rate is all images over both halves' time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from pixelcnn.images import encode_png  # noqa: E402
from pixelcnn import PixelCNN, load_dataset, load_model  # noqa: E402
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint  # noqa: E402
from pixelcnn.likelihood import score  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained checkpoint (default: a fresh model of --hidden/--blocks)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--source", choices=("mnist", "folder"), default="mnist",
                   help="mnist: the job scores torchvision's MNIST test split (all 10,000); folder: the first "
                   "--num-images of it written as PNGs, which the job's read tasks decode")
    p.add_argument("--num-images", type=int, default=4096, help="--source folder: how many")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "mnist"), help="MNIST's torchvision root")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass, bare loop and job alike")
    p.add_argument("--rows-per-file", type=int, default=1000)
    p.add_argument("--num-actors", type=int, default=2)
    p.add_argument("--gpus-per-actor", type=float, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32", help="as score.py's")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    device = "cuda" if args.gpus_per_actor else "cpu"
    test = load_dataset("mnist", args.data_dir, train=False)
    levels = test.images if args.source == "mnist" else test.images[:args.num_images]
    with tempfile.TemporaryDirectory(prefix="scoring-", dir="/tmp") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(0)
            checkpoint = os.path.join(tmp, "model.pt")
            save_checkpoint(checkpoint, checkpoint_dict(PixelCNN(hidden=args.hidden, blocks=args.blocks), step=0))
        dataset = "mnist"
        if args.source == "folder":
            dataset = os.path.join(tmp, "png")
            for k, (image, label) in enumerate(zip(levels.numpy(), test.labels[:len(levels)].tolist())):
                os.makedirs(os.path.join(dataset, str(label)), exist_ok=True)
                with open(os.path.join(dataset, str(label), f"{k:05d}.png"), "wb") as f:
                    f.write(encode_png(image))
        model = load_model(checkpoint, device=device).to(getattr(torch, args.dtype)).eval()
        batches = [levels[a:a + args.batch_size] for a in range(0, len(levels), args.batch_size)]
        half = len(batches) // 2

        def bare(part) -> float:
            started = time.perf_counter()
            for batch in part:
                score(model, batch.to(device))["log_prob"].cpu()
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started

        bare(batches[:1])  # warm-up
        before = bare(batches[:half])

        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   RAY_TMPDIR=tempfile.mkdtemp(prefix="rs", dir="/tmp"))
        cmd = [
            sys.executable, os.path.join(REPO, "jobs", "score.py"), "--checkpoint", checkpoint, "--dataset", dataset,
            "--output", os.path.join(tmp, "out"), "--batch-size", str(args.batch_size),
            "--rows-per-file", str(args.rows_per_file), "--num-actors", str(args.num_actors),
            "--gpus-per-actor", str(args.gpus_per_actor), "--dtype", args.dtype,
        ]
        if args.source == "mnist":
            cmd += ["--data-dir", os.path.abspath(args.data_dir), "--split", "test"]
        started = time.perf_counter()
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - started
        if job.returncode:
            sys.exit(f"score.py failed:\n{job.stderr[-3000:]}")
        summary = json.loads(job.stdout.strip().splitlines()[-1])
        after = bare(batches[half:])
    count = len(levels)
    assert summary["images"] == count, summary
    bare_rate = count / (before + after)
    figures = {
        "images": count, "batch_size": args.batch_size, "device": device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "num_actors": args.num_actors, "source": args.source,
        "bare_images_per_s": bare_rate, "bare_before_images_per_s": sum(len(b) for b in batches[:half]) / before if half else None,
        "bare_after_images_per_s": sum(len(b) for b in batches[half:]) / after,
        "job_images_per_s": summary["images_per_s"], "job_pipeline_s": summary["seconds"],
        "job_wall_s": wall, "job_wall_images_per_s": count / wall,
    }
    figures["ratio_job_pipeline"] = figures["job_images_per_s"] / bare_rate
    figures["ratio_job_wall"] = figures["job_wall_images_per_s"] / bare_rate
    halves = (f"{figures['bare_before_images_per_s']:.1f} before the job, " if half else "") + \
        f"{figures['bare_after_images_per_s']:.1f} after"
    print(f"bare forward pass: {bare_rate:.1f} images/s ({count} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {device}, {args.dtype}; {halves})")
    print(f"whole job: {figures['job_images_per_s']:.1f} images/s (its summary: {summary['seconds']:.1f} s from "
          f"its pipeline's start; {args.num_actors} actors)")
    print(f"whole job wall clock: {figures['job_wall_images_per_s']:.1f} images/s ({wall:.1f} s for the process: "
          "interpreter, Ray start-up, scan included)")
    print(f"ratio job / bare: {figures['ratio_job_pipeline']:.2f}")
    print(f"ratio job wall clock / bare: {figures['ratio_job_wall']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
