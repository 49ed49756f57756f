"""Training throughput (images/s per worker) of the reference PixelCNN, side by side in one run:
eager fp32 vs the optimised path, and 1 vs 2 DDP workers.

    .venv/bin/python benchmarks/train_throughput.py                  # CPU (gloo)
    .venv/bin/python benchmarks/train_throughput.py --device cuda    # GPU: bf16 + channels_last + compile

Each configuration runs the training step the library runs (forward, cross-entropy, backward,
gradient clipping, AdamW) on MNIST-shaped batches, in fresh processes; DDP workers are real
torch.distributed processes (gloo on CPU, NCCL on GPU), which is what Ray Train's TorchTrainer
sets up around ``jobs/train.py``. FLOPs are counted from the conv shapes (masked taps included,
since the dense kernels compute them): 3x the forward for a training step.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def forward_flops(model, height: int, width: int) -> float:
    """2 x multiply-adds of every conv per image (masked taps included: dense kernels compute them)."""
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            total += 2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * height * width
    return float(total)


def worker(rank: int, world: int, cfg: dict, port: int, out) -> None:
    from pixelcnn import PixelCNN
    from pixelcnn.likelihood import loss_per_dim, model_logits

    device = torch.device(cfg["device"] if cfg["device"] == "cpu" else f"cuda:{rank}")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = PixelCNN(hidden=cfg["hidden"], blocks=cfg["blocks"]).to(device)
    if cfg["optimised"] and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg["optimised"]:
        train_model = torch.compile(train_model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["optimised"] and device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # as TrainConfig's default
    levels = torch.randint(0, 256, (cfg["batch"], 1, 28, 28), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with autocast:
            loss = loss_per_dim(model_logits(train_model, levels), levels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(cfg["warmup"]):
        step()
    sync()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    sync()
    seconds = time.perf_counter() - start
    if rank == 0:
        out.put({"images_per_s_per_worker": cfg["batch"] * cfg["steps"] / seconds,
                 "flops_per_image": 3 * forward_flops(model, 28, 28)})
    if world > 1:
        dist.destroy_process_group()


def run(world: int, cfg: dict) -> dict:
    ctx = tmp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=worker, args=(r, world, cfg, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--blocks", type=int, default=15)
    p.add_argument("--batch", type=int, help="images per worker per step (default: 16 on CPU, 256 on GPU)")
    p.add_argument("--steps", type=int, help="timed steps (default: 3 on CPU, 50 on GPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile configuration")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    gpu = args.device != "cpu"
    base = {"device": args.device, "hidden": args.hidden, "blocks": args.blocks,
            "batch": args.batch or (256 if gpu else 16), "steps": args.steps or (50 if gpu else 3),
            "warmup": 3 if gpu else 1}
    configs = [("eager fp32, 1 worker", 1, False), ("eager fp32, 2 workers", 2, False)]
    if not args.no_compile:
        configs.insert(1, (("bf16+channels_last+compile" if gpu else "compile") + ", 1 worker", 1, True))
    results = {}
    for name, world, optimised in configs:
        if world > (torch.cuda.device_count() if gpu else 2):
            continue
        results[name] = r = run(world, {**base, "optimised": optimised})
        flops = r["images_per_s_per_worker"] * r["flops_per_image"]
        line = f"{name:38s} {r['images_per_s_per_worker']:8.2f} images/s per worker  {flops / 1e9:8.1f} GFLOP/s per worker"
        if gpu:
            name_gpu = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name_gpu), None)
            if peak:
                line += f"  MFU {flops / peak:.1%} of bf16 peak"
        print(line, flush=True)
    eager = results["eager fp32, 1 worker"]["images_per_s_per_worker"]
    for name, r in results.items():
        print(f"ratio {name:32s} / eager 1 worker: {r['images_per_s_per_worker'] / eager:.2f}x per worker")
    print(f"model hidden={args.hidden} blocks={args.blocks}, batch {base['batch']}/worker, "
          f"{next(iter(results.values()))['flops_per_image'] / 1e9:.1f} GFLOP per training image; "
          f"machine {platform.machine()}, {os.cpu_count()} CPUs, device {args.device}")


if __name__ == "__main__":
    main()
