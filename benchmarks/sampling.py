"""Samples/s of the naive and the cached sampler, side by side, and their ratio.

    .venv/bin/python benchmarks/sampling.py                 # CPU: mid-size and reference model
    python3 benchmarks/sampling.py --device cuda            # on a GPU: reference model, + CUDA graphs, bf16,
                                                            # and the fused kernel

Cached: full images through ``pixelcnn.sample(sampler="cached")``, timed end to end. On a GPU,
"cached" replays the sampling loop as one CUDA graph (two untimed calls first: the first runs eagerly,
the second captures), "eager" is the same sampler with ``cuda_graph=False``, and "bf16" is the graphed
sampler with the model cast to bfloat16 (its images differ from float32's once a draw lands on the other
side of a CDF boundary, so the script also reports how far the bf16 sampler's log-probs are from the
float32 model's, in bits/dim). "fused" and "fused-bf16" are the same with ``sampler="fused"`` (one
Triton kernel per pixel step), with the kernel's default tiles and with each ``--fused-tiles`` choice.
Naive: one full forward pass per pixel, so its time per image is (time of one forward pass at the
batch size) x H x W x C; that per-step time is measured on the spot (mean of a few passes; the
sampling draw itself is negligible beside a forward pass), after three untimed passes. Where a full naive run is affordable
(``--verify-naive``) it is also run end to end to check that extrapolation. On CPU each configuration
runs in a fresh subprocess, so "peak MB" is that process's peak resident memory, model and
interpreter included; on a GPU it is the peak allocated device memory of the configuration.
Per model it also counts the cached sampler's PyTorch ops per pixel step (views excluded, counted at
the dispatcher on the CPU): on a GPU each is at least one kernel, and where the sampler is bound by
kernel launches (small batches, CUDA graphs or not) that count sets its speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from queue import Empty

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {"mid": dict(hidden=64, blocks=7), "reference": dict(hidden=128, blocks=15)}
FAST_METHODS = ("cached", "eager", "bf16")  # the cached sampler: graphed, eager, graphed on a bf16 copy
FUSED_METHODS = ("fused", "fused-bf16")  # sampler="fused", graphed: float32, bf16 copy (GPU only)
TILE_KNOBS = ("BLOCK_K", "BLOCK_N", "NUM_WARPS", "NUM_STAGES")  # pixelcnn/fused.py's, as --fused-tiles KxNxW[xS]


def parse_tiles(tiles: str) -> list[int]:
    """``"64x128x4"`` or ``"64x128x4x2"`` -> the values of TILE_KNOBS (the first three or all four)."""
    parts = tiles.split("x")
    values = [int(v) if v.isdigit() else 0 for v in parts]
    if len(values) not in (3, 4) or min(values) < 1 or any(v & (v - 1) for v in values[:3]):
        raise ValueError(f"--fused-tiles {tiles!r}: want KxNxWARPS[xSTAGES], K, N and WARPS powers of 2 (e.g. 64x128x4)")
    return values


def measure(kind: str, method: str, batch: int, device: str, naive_steps: int, full_naive: bool,
            tiles: str | None = None) -> dict:
    import torch

    from pixelcnn import PixelCNN, sample
    from pixelcnn.data import levels_to_input
    from pixelcnn.likelihood import nll_per_image

    torch.manual_seed(0)
    model = PixelCNN(**MODELS[kind]).to(device).eval()
    c, (h, w) = model.config.in_channels, model.config.image_size
    gpu = device.startswith("cuda")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    extra = {}
    if tiles:  # the fused kernel's BLOCK_K, BLOCK_N, NUM_WARPS[, NUM_STAGES] for this configuration
        import pixelcnn.sampling.fused

        for knob, value in zip(TILE_KNOBS, parse_tiles(tiles)):
            setattr(pixelcnn.sampling.fused, knob, value)
        extra["tiles"] = tiles
    if method in FAST_METHODS + FUSED_METHODS:
        fast = copy.deepcopy(model).to(torch.bfloat16) if method.endswith("bf16") else model
        opts = dict(batch_size=batch, cuda_graph=method != "eager",
                    sampler="fused" if method in FUSED_METHODS else "cached")
        for seed in range(2 if gpu else 1):  # warm-up; on a GPU the second call captures the graph
            sample(fast, batch, seed=100 + seed, **opts)
        sync()
        start = time.perf_counter()
        out = sample(fast, batch, seed=1, **opts)
        sync()
        seconds = time.perf_counter() - start
        how = "full run"
        peak_mb = _peak_mb(gpu)  # before the scoring below, which runs the float32 model
        if method.endswith("bf16"):  # the float32 model's likelihood of the bf16 sampler's images
            with torch.no_grad():
                images = out.images.to(device).long()
                exact = -nll_per_image(model(levels_to_input(images)), images).cpu()
            extra["bf16_log_prob_error_bits_per_dim"] = float((out.log_prob - exact).abs().mean() / (c * h * w) / math.log(2))
    elif full_naive:
        start = time.perf_counter()
        sample(model, batch, batch_size=batch, seed=1, sampler="naive")
        sync()
        seconds = time.perf_counter() - start
        how = "full run"
    else:
        x = levels_to_input(torch.randint(0, 256, (batch, c, h, w), device=device))
        with torch.no_grad():
            for _ in range(3):  # warm-up: on a GPU the first passes are slower (cuDNN's set-up)
                model(x)
            sync()
            start = time.perf_counter()
            for _ in range(naive_steps):
                model(x)
            sync()
        seconds = (time.perf_counter() - start) / naive_steps * h * w * c
        how = f"{naive_steps} passes x {h * w * c}"
    if method not in FAST_METHODS + FUSED_METHODS:
        peak_mb = _peak_mb(gpu)
    return {"model": kind, "method": method, "batch": batch, "samples_per_s": batch / seconds, "peak_mb": peak_mb,
            "how": how, **extra}


def ops_per_pixel_step(kind: str) -> float:
    """The cached sampler's PyTorch ops per pixel step, views excluded (batch 1, on the CPU)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from pixelcnn import PixelCNN, sample

    class CountOps(TorchDispatchMode):  # sees every op the dispatcher runs, as a GPU would launch it
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not func.is_view
            return func(*args, **(kwargs or {}))

    model = PixelCNN(**MODELS[kind]).eval()
    with CountOps() as ops:
        sample(model, 1)
    c, (h, w) = model.config.in_channels, model.config.image_size
    return ops.count / (h * w * c)


def _peak_mb(gpu: bool) -> float:
    import torch

    if gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(queue, fn, *args):
    try:
        queue.put((True, fn(*args)))
    except Exception as e:  # sent back, or the parent would wait on the queue for ever
        queue.put((False, f"{type(e).__name__}: {e}"))


def in_child(fn, *args):
    """``fn(*args)`` in a fresh process: its peak memory is its own (a child inherits its parent's peak).
    An exception there is raised here as a RuntimeError with its message."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, *args))
    proc.start()
    while True:
        try:
            ok, result = queue.get(timeout=1)
            break
        except Empty:  # a child killed outright (a crash, out of memory) sends nothing
            if not proc.is_alive() and queue.empty():
                ok, result = False, f"the child process died (exit code {proc.exitcode})"
                break
    proc.join()
    if not ok:
        raise RuntimeError(result)
    return result


def run_isolated(kind: str, method: str, batch: int, device: str, naive_steps: int, full_naive: bool,
                 tiles: str | None = None) -> dict:
    args = (kind, method, batch, device, naive_steps, full_naive, tiles)
    # On a GPU, device memory peaks are per configuration already: spare the start-ups, except where
    # the fused kernel's tiles are changed (module settings, so in a process of their own).
    if device.startswith("cuda") and tiles is None:
        return measure(*args)
    return in_child(measure, *args)


def run_tiles(kind: str, method: str, batch: int, device: str, naive_steps: int, tiles: str | None) -> dict:
    """A fast sampler's row; for a --fused-tiles choice, its error in place of a rate if it fails (tiles
    that need more shared memory than the GPU has fail to launch), so the sweep goes on."""
    try:
        return run_isolated(kind, method, batch, device, naive_steps, False, tiles)
    except RuntimeError as e:
        if tiles is None:
            raise
        return {"model": kind, "method": method, "batch": batch, "tiles": tiles, "error": str(e).splitlines()[0]}


def describe(row: dict, naive: dict) -> str:
    name = row["method"] + (f"[{row['tiles']}]" if "tiles" in row else "")
    if "error" in row:
        return f"{name} failed ({row['error']})"
    return (f"{name} {row['samples_per_s']:9.2f}/s ({row['peak_mb']:6.0f} MB, "
            f"{row['samples_per_s'] / naive['samples_per_s']:.1f}x)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked, with the lists they name filled in (models, batches, methods, tile choices)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", help="comma-separated: mid, reference (default: both on CPU, reference on a GPU)")
    p.add_argument("--batches", help="default: 1,16,64,256 (CPU), 1,16,64,256,1024,4096 (GPU)")
    p.add_argument("--naive-steps", type=int, default=3, help="forward passes timed for the naive rate")
    p.add_argument("--verify-naive", type=int, default=16,
                   help="also run the naive sampler in full up to this batch (first model only)")
    p.add_argument("--fused-tiles", default="",
                   help="GPU: also time the fused sampler with these tiles, comma-separated KxNxWARPS[xSTAGES] "
                        "(e.g. 64x128x4,64x128x4x2)")
    p.add_argument("--methods", help="comma-separated fast samplers to time (default: all the device has: cached on "
                                     "CPU; cached, eager, bf16, fused, fused-bf16 on a GPU); naive is always timed")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.tile_choices = [t for t in args.fused_tiles.split(",") if t]
    for tiles in args.tile_choices:
        try:
            parse_tiles(tiles)
        except ValueError as e:
            p.error(str(e))
    args.models = (args.models or ("reference" if gpu else "mid,reference")).split(",")
    args.batches = [int(b) for b in (args.batches or ("1,16,64,256,1024,4096" if gpu else "1,16,64,256")).split(",")]
    available = FAST_METHODS + FUSED_METHODS if gpu else ("cached",)
    args.methods = args.methods.split(",") if args.methods else list(available)
    if set(args.methods) - set(available):
        p.error(f"--methods: {','.join(sorted(set(args.methods) - set(available)))} not among {','.join(available)} "
                f"on {args.device}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gpu, models, batches, methods = args.device.startswith("cuda"), args.models, args.batches, args.methods
    fast_methods = [(m, None) for m in methods]  # (method, fused kernel tiles or None for its defaults)
    fast_methods += [(m, t) for t in args.tile_choices if gpu for m in FUSED_METHODS if m in methods]
    rows = []
    for kind in models:
        ops = in_child(ops_per_pixel_step, kind)
        rows.append({"model": kind, "ops_per_pixel_step": ops})
        print(f"{kind:9s} cached sampler: {ops:.0f} PyTorch ops per pixel step (views excluded)", flush=True)
        for batch in batches:
            fast = [run_tiles(kind, m, batch, args.device, args.naive_steps, t) for m, t in fast_methods]
            naive = run_isolated(kind, "naive", batch, args.device, args.naive_steps, False)
            rows += [*fast, naive]
            line = f"{kind:9s} batch {batch:4d}: " + "  ".join(describe(r, naive) for r in fast)
            line += f"  naive {naive['samples_per_s']:9.4f}/s ({naive['peak_mb']:6.0f} MB, {naive['how']})"
            for r in fast:
                if "bf16_log_prob_error_bits_per_dim" in r:
                    line += f"  {r['method']} log-prob error {r['bf16_log_prob_error_bits_per_dim']:.2e} bits/dim"
            if kind == models[0] and batch <= args.verify_naive:
                full = run_isolated(kind, "naive", batch, args.device, args.naive_steps, True)
                rows.append(full)
                line += f"  [naive full run {full['samples_per_s']:.4f}/s]"
            print(line, flush=True)
    where = f"device {args.device}"
    if gpu:
        import torch

        where += f" ({torch.cuda.get_device_name()}, torch {torch.__version__})"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {where}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
