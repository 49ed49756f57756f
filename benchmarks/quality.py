"""Test bits/dim of PixelCNN vs Gated PixelCNN after equal wall-clock training budgets, in one run.

    .venv/bin/python benchmarks/quality.py                         # CPU: small models, 4 min each
    .venv/bin/python benchmarks/quality.py --device cuda --budget 600 --hidden 128 --blocks 15 \\
        --gated-hidden 128 --batch-size 128 --amp bf16               # one GPU, ~10 min each

Each model first times a few training steps; the budget then buys a number of steps, and the run trains
exactly one pass over that many batches of MNIST (so the cosine schedule ends at the budget), through
the library's own loop (``pixelcnn.training.train``, EMA on). The figure is exact NLL on the full
10,000-image MNIST test set, for the EMA and the raw weights.
"""

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

from pixelcnn.data import load_dataset  # noqa: E402
from pixelcnn.likelihood import loss_per_dim, model_logits  # noqa: E402
from pixelcnn.training import MODELS, Runtime, TrainConfig, train  # noqa: E402


def seconds_per_step(cfg: TrainConfig, device: str, steps: int = 3) -> float:
    model_class, _ = MODELS[cfg.model]
    model = model_class(cfg.model_config()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    levels = load_dataset(cfg.dataset, cfg.data_dir, train=True, subset=cfg.batch_size).images.to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    for n in range(steps + 1):
        if n == 1:
            start = time.perf_counter()
        with autocast:
            loss = loss_per_dim(model_logits(model, levels), levels)
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
    args = p.parse_args()
    common = dict(dataset="mnist", data_dir=os.path.abspath(args.data_dir), batch_size=args.batch_size, lr=args.lr,
                  epochs=1, amp=args.amp, grid_samples=0, log_every=10**9)
    candidates = {
        f"PixelCNN h={args.hidden} blocks={args.blocks}": dict(model="pixelcnn", hidden=args.hidden, blocks=args.blocks),
        f"Gated PixelCNN h={args.gated_hidden} layers={args.layers}": dict(model="gated", hidden=args.gated_hidden, layers=args.layers),
    }
    rows = []
    for name, model_args in candidates.items():
        probe = TrainConfig(**common, **model_args)
        steps = max(1, int(args.budget / seconds_per_step(probe, args.device)))
        cfg = TrainConfig(**common, **model_args, subset=steps * args.batch_size)
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            metrics = train(cfg, Runtime(run_dir, device=args.device, log=lambda *a, **k: None))
            wall = time.perf_counter() - start
        params = sum(t.numel() for t in MODELS[cfg.model][0](cfg.model_config()).parameters())
        rows.append((name, params, steps, wall, metrics["test_bits_per_dim"], metrics["test_bits_per_dim_raw"]))
        print(f"{name:34s} {params / 1e6:5.2f}M params  {steps:5d} steps  {wall:6.0f} s (incl. eval)  "
              f"test {metrics['test_bits_per_dim']:.4f} bits/dim (EMA), {metrics['test_bits_per_dim_raw']:.4f} (raw)",
              flush=True)
    print(f"budget {args.budget:.0f} s of training per model, batch {args.batch_size}, lr {args.lr}; "
          f"machine {platform.machine()}, {os.cpu_count()} CPUs, device {args.device}")


if __name__ == "__main__":
    main()
