"""Samples/s of the whole generation job vs the bare sampler loop, on the same machine, in one run.

    .venv/bin/python benchmarks/generation.py                                    # CPU
    .venv/bin/python benchmarks/generation.py --gpus-per-actor 1 --num-actors 1 \\
        --hidden 128 --blocks 15 --num-samples 200000 --batch-size 4096          # one GPU
    ... --sampler fused --dtype bfloat16                                         # the job's faster GPU settings
    .venv/bin/python benchmarks/generation.py --encode-only                      # the encode rate alone

The bare loop is ``pixelcnn.sample`` in this process using every CPU thread (or the GPU). The job is
``jobs/generate.py`` with an in-process Ray: actors, PNG encoding, Parquet writes and Ray's start-up
all counted (the job's own summary line: samples / seconds). Their ratio is the job's efficiency.

Then the encode rate: rows/s of ``jobs.generate.encode_rows`` (PNG encoding and the Arrow table, the CPU
tasks' work) on --encode-batch 28x28 samples in this process, one core (PIL encodes on the calling
thread), best and median of three; on the bare loop's own samples (noise, for a fresh model) and on as
many MNIST test images (what a trained model's samples look like) when --data-dir holds MNIST. From it,
the share of a GPU actor's time that encoding would take had it stayed in the actor, serially after
sampling at --gpu-rate samples/s: (1 / encode rate) / (1 / gpu rate + 1 / encode rate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from pixelcnn import PixelCNN, load_model, sample  # noqa: E402
from pixelcnn.checkpoint import checkpoint_dict, save_checkpoint  # noqa: E402
from pixelcnn.sampling import SAMPLERS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--encode-only", action="store_true", help="only the encode rate (samples drawn untimed), no job")
    p.add_argument("--encode-batch", type=int, default=4096, help="rows per encode_rows call timed")
    p.add_argument("--gpu-rate", type=float, default=6000.0, help="samples/s of one GPU actor's sampler to set the "
                   "encode rate against (default: the H100's, reference model, bf16, batch 4096, docs/benchmarks.md)")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "mnist"),
                   help="MNIST's torchvision root, for the encode rate on MNIST images (skipped if absent)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = "cuda" if args.gpus_per_actor else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(0)
            checkpoint = os.path.join(tmp, "model.pt")
            save_checkpoint(checkpoint, checkpoint_dict(PixelCNN(hidden=args.hidden, blocks=args.blocks), step=0))
        model = load_model(checkpoint, device=device).to(getattr(torch, args.dtype))
        if args.encode_only:
            samples = sample(model, args.encode_batch, batch_size=args.batch_size, sampler=args.sampler).images
            encode_figures(samples.cpu().numpy(), args)
            return

        # The bare loop: the same samples (ids 0..N-1, same batch size) in this process.
        opts = dict(batch_size=args.batch_size, sampler=args.sampler)
        sample(model, args.batch_size, **opts)  # warm-up at the timed batch shape (first calls allocate)
        start = time.perf_counter()
        drawn = sample(model, args.num_samples, **opts)
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
    encode_figures(drawn.images[:args.encode_batch].cpu().numpy(), args)


def encode_rate(images: np.ndarray, repeats: int = 3) -> tuple[float, float]:
    """(best, median) rows/s of ``jobs.generate.encode_rows`` on ``images`` (uint8 [N, C, H, W]), one call each."""
    import statistics

    from jobs.generate import Manifest, encode_rows

    n = len(images)
    manifest = Manifest(checkpoint="benchmark", model_sha256="0" * 64, seed=0, temperature=1.0, label_probs=None,
                        dtype="float32", sampler="cached", rows_per_file=n, data_shape=list(images.shape[1:]))
    batch = {"id": np.arange(n, dtype=np.int64), "image": np.ascontiguousarray(images, dtype=np.uint8),
             "log_prob": np.full(n, -700.0), "label": np.full(n, -1)}
    encode_rows({k: v[:8] for k, v in batch.items()}, manifest)  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        table = encode_rows(batch, manifest)
        rates.append(n / (time.perf_counter() - started))
        assert table.num_rows == n
    return max(rates), statistics.median(rates)


def encode_figures(samples: np.ndarray, args) -> None:
    batches = {"samples": samples}
    try:
        from pixelcnn import load_dataset

        if samples.shape[1:] == (1, 28, 28):
            batches["MNIST images"] = load_dataset("mnist", args.data_dir, train=False).images[:len(samples)].numpy()
    except Exception as error:  # no MNIST here: the samples' figure alone
        print(f"(no MNIST under {args.data_dir}: {type(error).__name__})")
    for name, images in batches.items():
        best, median = encode_rate(images)
        share = (1 / best) / (1 / args.gpu_rate + 1 / best)
        print(f"encode rate ({name}): {best:,.0f} rows/s per core (median of 3: {median:,.0f}; {len(images)} rows "
              f"{'x'.join(map(str, images.shape[1:]))})")
        print(f"encoding in the actor at {args.gpu_rate:,.0f} samples/s ({name}): {100 * share:.0f}% of its time, "
              f"{1 / (1 / args.gpu_rate + 1 / best):,.0f} samples/s instead of {args.gpu_rate:,.0f}")


if __name__ == "__main__":
    main()
