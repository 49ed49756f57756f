"""Samples/s of the whole generation job vs the bare sampler loop, on the same machine, in one run.

    .venv/bin/python benchmarks/generation.py                                    # CPU
    .venv/bin/python benchmarks/generation.py --gpus-per-actor 1 --num-actors 1 \\
        --hidden 128 --blocks 15 --num-samples 200000 --batch-size 4096          # one GPU
    ... --sampler fused --dtype bfloat16                                         # the job's faster GPU settings

The bare loop is ``pixelcnn.sample`` in this process using every CPU thread (or the GPU). The job is
``jobs/generate.py`` with an in-process Ray: actors, PNG encoding, Parquet writes and Ray's start-up
all counted (the job's own summary line: samples / seconds). Their ratio is the job's efficiency.
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

from pixelcnn import PixelCNN, load_model, sample  # noqa: E402
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint  # noqa: E402
from pixelcnn.sampling import SAMPLERS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained checkpoint (default: a fresh model of --hidden/--blocks)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rows-per-file", type=int, default=1024)
    p.add_argument("--num-actors", type=int, default=2)
    p.add_argument("--gpus-per-actor", type=float, default=0)
    p.add_argument("--sampler", choices=SAMPLERS, default="cached", help="as generate.py's (fused: GPU only)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="as generate.py's")
    args = p.parse_args()
    device = "cuda" if args.gpus_per_actor else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(0)
            checkpoint = os.path.join(tmp, "model.pt")
            save_checkpoint(checkpoint, checkpoint_dict(PixelCNN(hidden=args.hidden, blocks=args.blocks), step=0))
        model = load_model(checkpoint, device=device).to(getattr(torch, args.dtype))

        # The bare loop: the same samples (ids 0..N-1, same batch size) in this process.
        opts = dict(batch_size=args.batch_size, sampler=args.sampler)
        sample(model, min(args.batch_size, 8), **opts)  # warm-up
        start = time.perf_counter()
        sample(model, args.num_samples, **opts)
        if device == "cuda":
            torch.cuda.synchronize()
        bare = args.num_samples / (time.perf_counter() - start)
        print(f"bare sampler loop: {bare:.1f} samples/s ({torch.get_num_threads()} threads, {device}, {args.sampler}, "
              f"{args.dtype})", flush=True)

        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        cmd = [
            sys.executable, os.path.join(REPO, "jobs", "generate.py"), "--checkpoint", checkpoint,
            "--num-samples", str(args.num_samples), "--output", os.path.join(tmp, "out"),
            "--batch-size", str(args.batch_size), "--rows-per-file", str(args.rows_per_file),
            "--num-actors", str(args.num_actors), "--gpus-per-actor", str(args.gpus_per_actor),
            "--sampler", args.sampler, "--dtype", args.dtype,
        ]
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if job.returncode:
            sys.exit(f"generate.py failed:\n{job.stderr[-3000:]}")
        summary = json.loads(job.stdout.strip().splitlines()[-1])
    whole = summary["samples_per_s"]
    print(f"whole job:         {whole:.1f} samples/s ({args.num_actors} actors, {summary['seconds']:.1f} s incl. Ray start-up)")
    print(f"ratio job / bare:  {whole / bare:.2f}")
    print(f"one million samples at this rate: {1e6 / whole / 3600:.1f} hours on this machine")


if __name__ == "__main__":
    main()
