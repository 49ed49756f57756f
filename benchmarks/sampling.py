"""Samples/s of the naive and the cached sampler, side by side, and their ratio.

    .venv/bin/python benchmarks/sampling.py                 # CPU: mid-size and reference model
    .venv/bin/python benchmarks/sampling.py --device cuda   # on a GPU

Cached: full images through ``pixelcnn.sample(method="cached")``, timed end to end.
Naive: one full forward pass per pixel, so its time per image is (time of one forward pass at the
batch size) x H x W x C; that per-step time is measured on the spot (mean of a few passes; the
sampling draw itself is negligible beside a forward pass). Where a full naive run is affordable
(``--verify-naive``) it is also run end to end to check that extrapolation. Each configuration runs in a
fresh subprocess, so "peak MB" is that process's peak resident memory on CPU (peak allocated
device memory on a GPU), model and interpreter included.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {"mid": dict(hidden=64, blocks=7), "reference": dict(hidden=128, blocks=15)}


def measure(kind: str, method: str, batch: int, device: str, naive_steps: int, full_naive: bool) -> dict:
    import torch

    from pixelcnn import PixelCNN, sample
    from pixelcnn.data import levels_to_input

    torch.manual_seed(0)
    model = PixelCNN(**MODELS[kind]).to(device).eval()
    c, (h, w) = model.config.in_channels, model.config.image_size
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if method == "cached":
        sample(model, min(batch, 2), batch_size=batch, device=device)  # warm-up
        sync()
        start = time.perf_counter()
        sample(model, batch, batch_size=batch, seed=1, device=device)
        sync()
        seconds = time.perf_counter() - start
        how = "full run"
    elif full_naive:
        start = time.perf_counter()
        sample(model, batch, batch_size=batch, seed=1, method="naive", device=device)
        sync()
        seconds = time.perf_counter() - start
        how = "full run"
    else:
        x = levels_to_input(torch.randint(0, 256, (batch, c, h, w), device=device))
        with torch.no_grad():
            model(x)  # warm-up
            sync()
            start = time.perf_counter()
            for _ in range(naive_steps):
                model(x)
            sync()
        seconds = (time.perf_counter() - start) / naive_steps * h * w * c
        how = f"{naive_steps} passes x {h * w * c}"
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": kind, "method": method, "batch": batch, "samples_per_s": batch / seconds, "peak_mb": peak_mb, "how": how}


def _child(queue, *args):
    queue.put(measure(*args))


def run_isolated(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="mid,reference", help="comma-separated: mid, reference")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--naive-steps", type=int, default=3, help="forward passes timed for the naive rate")
    p.add_argument("--verify-naive", type=int, default=16, help="also run the naive sampler in full up to this batch (mid model)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for kind in args.models.split(","):
        for batch in batches:
            cached = run_isolated(kind, "cached", batch, args.device, args.naive_steps, False)
            naive = run_isolated(kind, "naive", batch, args.device, args.naive_steps, False)
            rows += [cached, naive]
            line = (
                f"{kind:9s} batch {batch:4d}: cached {cached['samples_per_s']:9.2f}/s ({cached['peak_mb']:6.0f} MB)  "
                f"naive {naive['samples_per_s']:9.4f}/s ({naive['peak_mb']:6.0f} MB, {naive['how']})  "
                f"ratio {cached['samples_per_s'] / naive['samples_per_s']:7.1f}x"
            )
            if kind == "mid" and batch <= args.verify_naive:
                full = run_isolated(kind, "naive", batch, args.device, args.naive_steps, True)
                rows.append(full)
                line += f"  [naive full run {full['samples_per_s']:.4f}/s]"
            print(line, flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {args.device}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
