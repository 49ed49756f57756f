"""Test bits/dim of every model family after the same training budget, side by side in one run, beside a
PixelCNN trained as a textbook would train it (the baseline).

    .venv/bin/python benchmarks/quality.py                      # CPU: 4 models x 240 s of training
    .venv/bin/python benchmarks/quality.py --models textbook,pixelcnnpp --plot benchmarks/quality-cpu.png
    python benchmarks/quality.py --device cuda --models gated --hidden 128 --layers 12 \\
        --batch-size 128 --lr 1e-3 --amp bf16 --compile --epochs 26   # the H100 recipe (400 s)

Models (``--models``; CPU sizes by default, changed by ``--hidden``, ``--filters`` and the like):

* ``textbook``: the seed architecture (a 7x7 mask-A convolution, residual blocks of 3x3 mask-B
  convolutions, two 1x1 convolutions, BatchNorm), h=32 and 4 blocks, trained as a tutorial would: Adam,
  batch 128, a constant learning rate of 1e-3, no warm-up, no clipping, no weight averaging.
* ``pixelcnn``: the same network without BatchNorm, with the project's recipe (AdamW, warm-up, a cosine
  schedule to zero at the budget, clipping, an EMA of the weights).
* ``gated``: Gated PixelCNN (no blind spot), the same recipe.
* ``pixelcnnpp``: PixelCNN++ (down and down-right streams, gated ResNet blocks at three resolutions, a
  discretized logistic mixture), the same recipe.

``--budget S``: each model first times a few bare training steps, and S seconds buy as many steps (one pass
over that many batches of MNIST, or as many whole epochs as fit, so the cosine schedule ends at the
budget). Evaluations and the loop's reports are not in the budget. ``--epochs N`` trains N epochs instead.
Training runs through the library's own loop (``pixelcnn.training.train``); test bits/dim are exact NLL on
the MNIST test set (all 10,000 images unless ``--test-subset``), at ``--points`` times along each run: the
curve against seconds of training that ``--plot`` draws. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from pixelcnn import load_model, sample  # noqa: E402
from pixelcnn.config import TrainConfig  # noqa: E402
from pixelcnn.data import load_dataset  # noqa: E402
from pixelcnn.figures import PALETTE, grid_png, lines_png  # noqa: E402
from pixelcnn.likelihood import loss_per_dim, model_logits  # noqa: E402
from pixelcnn.models import MODELS  # noqa: E402
from pixelcnn.training import Runtime, train  # noqa: E402

MNIST_TRAIN_IMAGES = 60000
# A tutorial's recipe: Adam at a constant 1e-3 on batches of 128, nothing else.
TEXTBOOK = dict(model="pixelcnn", hidden=32, blocks=4, norm="batch", batch_size=128, lr=1e-3, schedule="constant",
                warmup_steps=0, grad_clip=0.0, ema=0.0)


def candidates(args) -> dict[str, dict]:
    """Each model's name and TrainConfig fields (the recipe's own are TrainConfig's defaults)."""
    recipe = dict(batch_size=args.batch_size, lr=args.lr, amp=args.amp, compile=args.compile)
    every = {
        "textbook": ("textbook PixelCNN h=32 blocks=4 (BatchNorm, Adam, constant lr)", TEXTBOOK),
        "pixelcnn": (f"PixelCNN h={args.hidden} blocks={args.blocks}",
                     dict(recipe, model="pixelcnn", hidden=args.hidden, blocks=args.blocks)),
        "gated": (f"Gated PixelCNN h={args.hidden} layers={args.layers}",
                  dict(recipe, model="gated", hidden=args.hidden, layers=args.layers)),
        "pixelcnnpp": (f"PixelCNN++ filters={args.filters} resnet={args.nr_resnet} mix={args.nr_logistic_mix}",
                       dict(recipe, model="pixelcnnpp", hidden=args.filters, nr_resnet=args.nr_resnet,
                            nr_logistic_mix=args.nr_logistic_mix)),
    }
    unknown = set(args.models.split(",")) - set(every)
    if unknown:
        raise SystemExit(f"error: --models: unknown {', '.join(sorted(unknown))} (choose from {', '.join(every)})")
    return {key: every[key] for key in args.models.split(",")}


def seconds_per_step(cfg: TrainConfig, device: str) -> float:
    """Mean time of a bare training step (channels_last on a GPU, as ``train`` does)."""
    warmup, steps = (5, 20) if device == "cuda" else (1, 3)
    model = MODELS[cfg.model](cfg.model_config()).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model  # compiled in the warm-up steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    levels = load_dataset(cfg.dataset, cfg.data_dir, train=True, subset=cfg.batch_size).images.to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
    model.train()
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


def run(key: str, fields: dict, args, log) -> dict:
    """Train one model for the budget; its figures and its test curve."""
    common = dict(dataset="mnist", data_dir=os.path.abspath(args.data_dir), epochs=1, grid_samples=0,
                  log_every=args.log_every or 10**9, test_subset=args.test_subset, seed=args.seed)
    cfg = TrainConfig(**common, **fields)
    steps_per_epoch = MNIST_TRAIN_IMAGES // cfg.batch_size
    if args.epochs:
        steps = args.epochs * steps_per_epoch
    else:
        steps = max(1, int(args.budget / seconds_per_step(cfg, args.device)))
    # The budget buys as many whole epochs of the full training set as fit when it covers one;
    # else one pass over the first steps x batch images. The cosine schedule ends with the run.
    if steps >= steps_per_epoch:
        run_args = dict(epochs=steps // steps_per_epoch)
        steps = run_args["epochs"] * steps_per_epoch
    else:
        run_args = dict(subset=max(steps * cfg.batch_size, cfg.batch_size))
    cfg = TrainConfig(**{**common, **run_args}, **fields, eval_every=max(1, steps // max(1, args.points)))
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        metrics = train(cfg, Runtime(run_dir, device=args.device, log=log))
        wall = time.perf_counter() - start
        with open(os.path.join(run_dir, "curve.jsonl")) as f:
            curve = [(p["train_s"], p["test_bits_per_dim"]) for p in map(json.loads, f) if "test_bits_per_dim" in p]
        if args.grid:
            model = load_model(run_dir, device=args.device)  # the EMA weights where there are some
            stem, ext = os.path.splitext(args.grid)
            with open(f"{stem}-{key}{ext or '.png'}", "wb") as f:
                f.write(grid_png(sample(model, 64, seed=0, batch_size=64).images))
    params = sum(t.numel() for t in MODELS[cfg.model](cfg.model_config()).parameters())
    return {"model": key, "params": params, "steps": steps, "batch_size": cfg.batch_size, "wall_s": round(wall, 1),
            "train_s": metrics["train_s"], "test_bits_per_dim": metrics["test_bits_per_dim"],
            "test_bits_per_dim_raw": metrics["test_bits_per_dim_raw"], "curve": curve}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "mnist"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="textbook,pixelcnn,gated,pixelcnnpp",
                   help="comma-separated: textbook, pixelcnn, gated, pixelcnnpp")
    p.add_argument("--budget", type=float, default=240, help="seconds of training steps per model")
    p.add_argument("--epochs", type=int, default=0, help="train this many epochs instead of a timed --budget")
    p.add_argument("--batch-size", type=int, default=64, help="every model but the textbook one (128)")
    p.add_argument("--lr", type=float, default=2e-3, help="every model but the textbook one (1e-3)")
    p.add_argument("--amp", default="off")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (compile time is not budgeted)")
    p.add_argument("--hidden", type=int, default=32, help="pixelcnn h, gated channels per stack")
    # 16, not 32: on this CPU a step of 32 filters takes 2.6x as long (1.29 s against 0.49 s at batch 64).
    p.add_argument("--filters", type=int, default=16, help="pixelcnnpp filters (nr_filters)")
    p.add_argument("--blocks", type=int, default=4, help="pixelcnn residual blocks")
    p.add_argument("--layers", type=int, default=8, help="gated layers")
    p.add_argument("--nr-resnet", type=int, default=1, help="pixelcnnpp gated ResNet blocks per resolution")
    p.add_argument("--nr-logistic-mix", type=int, default=5, help="pixelcnnpp logistics per mixture")
    p.add_argument("--points", type=int, default=2, help="test evaluations along each run (the plot's points)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write the test curves (bits/dim against seconds of training) to this PNG")
    p.add_argument("--grid", help="write 64 samples of each trained model here (-<model> is added to the name)")
    p.add_argument("--log-every", type=int, default=0, help="print training progress every N steps (0: off)")
    args = p.parse_args(argv)
    chosen = candidates(args)
    t0 = time.perf_counter()

    def log(*a, **k):
        if args.log_every:
            print(f"[{time.perf_counter() - t0:4.0f} s]", *a, **{**k, "flush": True})

    rows = []
    for key, (name, fields) in chosen.items():
        row = run(key, fields, args, log)
        rows.append(row)
        print(f"{name:62s} {row['params'] / 1e6:5.2f}M params  {row['steps']:5d} steps of {row['batch_size']:3d}  "
              f"{row['train_s']:6.0f} s training ({row['wall_s']:.0f} s wall)  test {row['test_bits_per_dim']:.4f} "
              f"bits/dim ({row['test_bits_per_dim_raw']:.4f} raw)", flush=True)
    baseline = next((r for r in rows if r["model"] == "textbook"), None)
    if baseline:
        for r in rows:
            r["vs_textbook"] = round(1 - r["test_bits_per_dim"] / baseline["test_bits_per_dim"], 4)
        print("fewer test bits/dim than the textbook baseline: " +
              ", ".join(f"{r['model']} {100 * r['vs_textbook']:+.1f}%" for r in rows if r is not baseline), flush=True)
    what = f"{args.epochs} epochs" if args.epochs else f"budget {args.budget:.0f} s of training"
    test = f"the first {args.test_subset}" if args.test_subset else "all 10,000"
    print(f"{what} per model, test bits/dim on {test} MNIST test images; machine {platform.machine()}, "
          f"{os.cpu_count()} CPUs, device {args.device}, torch {torch.__version__}", flush=True)
    if args.plot:
        series = {r["model"]: (PALETTE[n % len(PALETTE)], r["curve"]) for n, r in enumerate(rows)}
        with open(args.plot, "wb") as f:
            f.write(lines_png(series, title="test bits/dim against seconds of training", xlabel="seconds"))
    print(json.dumps(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
