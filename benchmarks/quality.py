"""Test bits/dim of PixelCNN vs Gated PixelCNN after equal training budgets, in one run.

    .venv/bin/python benchmarks/quality.py                         # CPU: small models, 4 min each
    python benchmarks/quality.py --device cuda --models gated --gated-hidden 128 --layers 12 \\
        --batch-size 128 --lr 1e-3 --amp bf16 --compile --epochs 26   # the H100 recipe (400 s)

With ``--budget S`` each model first times a few bare training steps, and S buys a number of steps: one
pass over that many batches of MNIST, or as many whole epochs as fit (so the cosine schedule ends at the
budget). The loop's clipping, EMA and per-epoch evaluation are not in that timing (a GPU run takes
about 40% longer than S); ``--epochs N`` trains N epochs instead. Training runs through the library's
own loop (``pixelcnn.training.train``, EMA on). The figure is exact NLL on the full 10,000-image MNIST
test set, for the EMA and the raw weights."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from pixelcnn import load_model, sample  # noqa: E402
from pixelcnn.data import load_dataset  # noqa: E402
from pixelcnn.likelihood import loss_per_dim, model_logits  # noqa: E402
from pixelcnn.schema import grid_png  # noqa: E402
from pixelcnn.training import MODELS, Runtime, TrainConfig, train  # noqa: E402

MNIST_TRAIN_IMAGES = 60000


def seconds_per_step(cfg: TrainConfig, device: str) -> float:
    """Mean time of a training step as the loop runs it (channels_last on a GPU, as ``train`` does)."""
    warmup, steps = (5, 20) if device == "cuda" else (1, 3)
    model_class = MODELS[cfg.model]
    model = model_class(cfg.model_config()).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model  # compiled in the warm-up steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    levels = load_dataset(cfg.dataset, cfg.data_dir, train=True, subset=cfg.batch_size).images.to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    for n in range(warmup + steps):
        if n == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            loss = loss_per_dim(model_logits(step_model, levels), levels, model.config.distribution())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "mnist"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", type=float, default=240, help="training seconds per model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--amp", default="off")
    p.add_argument("--hidden", type=int, default=32, help="PixelCNN h")
    p.add_argument("--blocks", type=int, default=4, help="PixelCNN residual blocks")
    p.add_argument("--gated-hidden", type=int, default=32, help="Gated PixelCNN channels per stack")
    p.add_argument("--layers", type=int, default=8, help="Gated PixelCNN gated layers")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (compile time is not budgeted)")
    p.add_argument("--epochs", type=int, default=0, help="train this many epochs instead of a timed --budget")
    p.add_argument("--grid", help="write 64 samples of each trained model here (-<model> is added to the name)")
    p.add_argument("--models", default="pixelcnn,gated", help="comma-separated: pixelcnn, gated")
    p.add_argument("--log-every", type=int, default=0, help="print training progress every N steps (0: off)")
    args = p.parse_args()
    common = dict(dataset="mnist", data_dir=os.path.abspath(args.data_dir), batch_size=args.batch_size, lr=args.lr,
                  epochs=1, amp=args.amp, compile=args.compile, grid_samples=0, log_every=args.log_every or 10**9)
    candidates = {
        f"PixelCNN h={args.hidden} blocks={args.blocks}": dict(model="pixelcnn", hidden=args.hidden, blocks=args.blocks),
        f"Gated PixelCNN h={args.gated_hidden} layers={args.layers}": dict(model="gated", hidden=args.gated_hidden, layers=args.layers),
    }
    candidates = {name: c for name, c in candidates.items() if c["model"] in args.models.split(",")}
    t0 = time.perf_counter()

    def log(*a, **k):
        if args.log_every:
            print(f"[{time.perf_counter() - t0:4.0f} s]", *a, **{**k, "flush": True})

    rows = []
    steps_per_epoch = MNIST_TRAIN_IMAGES // args.batch_size
    for name, model_args in candidates.items():
        if args.epochs:
            steps = args.epochs * steps_per_epoch
        else:
            steps = max(1, int(args.budget / seconds_per_step(TrainConfig(**common, **model_args), args.device)))
        # The budget buys as many whole epochs of the full training set as fit when it covers one;
        # else one pass over the first steps x batch images. The cosine schedule ends with the run.
        if steps >= steps_per_epoch:
            run_args = dict(epochs=steps // steps_per_epoch)
            steps = run_args["epochs"] * steps_per_epoch
        else:
            run_args = dict(subset=steps * args.batch_size)
        cfg = TrainConfig(**{**common, **run_args}, **model_args)
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            metrics = train(cfg, Runtime(run_dir, device=args.device, log=log))
            wall = time.perf_counter() - start
            if args.grid:
                model = load_model(run_dir, device=args.device)  # the EMA weights
                stem, ext = os.path.splitext(args.grid)
                with open(f"{stem}-{cfg.model}{ext or '.png'}", "wb") as f:
                    f.write(grid_png(sample(model, 64, seed=0, batch_size=64).images))
        params = sum(t.numel() for t in MODELS[cfg.model](cfg.model_config()).parameters())
        rows.append((name, params, steps, wall, metrics["test_bits_per_dim"], metrics["test_bits_per_dim_raw"]))
        print(f"{name:34s} {params / 1e6:5.2f}M params  {steps:5d} steps  {wall:6.0f} s (incl. eval)  "
              f"test {metrics['test_bits_per_dim']:.4f} bits/dim (EMA), {metrics['test_bits_per_dim_raw']:.4f} (raw)",
              flush=True)
    what = f"{args.epochs} epochs" if args.epochs else f"budget {args.budget:.0f} s of training"
    print(f"{what} per model, batch {args.batch_size}, lr {args.lr}; "
          f"machine {platform.machine()}, {os.cpu_count()} CPUs, device {args.device}")


if __name__ == "__main__":
    main()
