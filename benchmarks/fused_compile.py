"""The fused pixel-step kernel compiled ahead of time, with no GPU: what a launch on one would build.

    .venv/bin/python benchmarks/fused_compile.py                          # default tiles; H100 and A10G
    .venv/bin/python benchmarks/fused_compile.py --tiles 32x64x4,64x128x4x2 --arch 90

For the reference model (hidden 128, 15 blocks, MNIST-sized) in float32 (without and with TF32),
bfloat16 and float64, it compiles ``pixelcnn.sampling.fused.pixel_step`` for each target GPU with Triton's own
LLVM and ptxas, its arguments specialized as a launch specializes them (16-byte aligned pointers,
multiples of 16, ints equal to 1), and prints for each kernel: shared memory per program, registers per
thread and spilled bytes (ptxas -v), whether its products run on tensor cores (``mma``), and the
async-copy waits of its pipelined weight loads (two per layer loop when every layer is pipelined).
That is what a tile choice costs in resources, not how fast it runs: benchmarks/sampling.py's
--fused-tiles on a GPU says that.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile for real, before anything imports Triton
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402  (how JITFunction.run specializes)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

import pixelcnn.sampling.fused  # noqa: E402
from pixelcnn import PixelCNN  # noqa: E402
from pixelcnn.sampling import make_stepper  # noqa: E402
from sampling import TILE_KNOBS, parse_tiles  # noqa: E402  (benchmarks/sampling.py)

ARCHS = {90: "H100", 86: "A10G"}  # cluster.yaml's GPU nodes are A10Gs
KERNELS = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee"), (torch.float64, "ieee")]


def compile_kernel(dtype: torch.dtype, precision: str, arch: int) -> dict:
    """Compile the reference model's pixel step for ``arch`` with the module's current tiles."""
    torch.set_num_threads(1)  # one compile per core (main's pool)
    model = PixelCNN(hidden=128, blocks=15).to(dtype).eval()
    stepper = make_stepper(model, 256, dtype, torch.device("cpu"), "fused")
    stepper.temperature, stepper.meta["PRECISION"] = torch.ones((), dtype=torch.float64), precision
    levels, u = torch.zeros(256, 1, 28, 28, dtype=torch.long), torch.rand(256, 28, 28, 1, dtype=torch.float64)
    args = stepper.kernel_args(3, 5, 0, u, levels, torch.zeros(256, dtype=torch.float64), torch.zeros(256, dtype=dtype))
    meta = dict(stepper.meta)
    options = {name: meta.pop(name) for name in ("num_warps", "num_stages", "enable_fp_fusion")}
    kernel = pixelcnn.sampling.fused.pixel_step
    signature, attrs = {}, {}
    for index, (param, arg) in enumerate(zip(kernel.params, args)):
        kind, key = native_specialize_impl(CUDABackend, arg, False, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            meta[param.name] = key
        else:
            signature[param.name], attrs[(index,)] = kind, CUDABackend.parse_attr(key or "")
    signature.update({name: "constexpr" for name in meta})
    compiled = compile(ASTSource(kernel, signature, meta, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {"shared_bytes": compiled.metadata.shared, **_ptxas_usage(ptx, arch),
            "tensor_cores": "mma.sync" in ptx or "wgmma" in ptx, "async_waits": ptx.count("cp.async.wait_group")}


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes, from ``ptxas -v`` (the ptxas Triton itself uses)."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"-arch={target}", source, "-o", source + ".o"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(spills.group(1)) + int(spills.group(2))}


def compile_row(task: tuple) -> dict:
    """One report row: ``row`` with what compiling its kernel with ``knobs`` (the tiles) costs, or its error."""
    row, knobs, dtype = task
    for knob, value in knobs.items():
        setattr(pixelcnn.sampling.fused, knob, value)
    try:
        return {**row, **compile_kernel(dtype, row["precision"], row["arch"])}
    except Exception as e:  # e.g. tiles that need more shared memory than exists
        return {**row, "error": " ".join(str(e).split())[:200]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", default="", help="comma-separated KxNxWARPS[xSTAGES] (default: fused.py's own)")
    p.add_argument("--arch", default="90,86", help="comma-separated compute capabilities (90: H100, 86: A10G)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="kernels compiled at once (default: one per core)")
    args = p.parse_args()
    try:
        choices = [(t, parse_tiles(t)) for t in args.tiles.split(",") if t] or [(None, None)]
    except ValueError as e:
        p.error(str(e))
    defaults = {knob: getattr(pixelcnn.sampling.fused, knob) for knob in TILE_KNOBS}
    rows = []
    for _, values in choices:
        knobs = {**defaults, **dict(zip(TILE_KNOBS, values or ()))}
        for arch in map(int, args.arch.split(",")):
            for dtype, precision in KERNELS:
                rows.append(({"tiles": "x".join(str(knobs[knob]) for knob in TILE_KNOBS), "arch": arch,
                              "gpu": ARCHS.get(arch, "?"), "dtype": str(dtype).removeprefix("torch."),
                              "precision": precision}, knobs, dtype))
    # Each kernel compiles on one core (Triton's LLVM and ptxas): one process per core, in a fresh
    # interpreter each (spawn: no forked torch or Triton state).
    with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(rows))) as pool:
        report = []
        for row in pool.imap(compile_row, rows):
            report.append(row)
            if not args.json:
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        json.dump(report, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
