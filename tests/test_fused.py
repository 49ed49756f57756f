"""The fused pixel step (``sampler="fused"``, one Triton kernel per step) draws the naive sampler's images.

In the test process the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set by
conftest.py before Triton is imported): the same kernel source, each program run on the CPU in turn.
It checks the kernel's arithmetic, indexing and masking. Its compilation for a GPU is checked in a
child process without the interpreter (ahead of time for an H100, no GPU needed), and where a GPU is
present the compiled kernel is run against the CPU sampler; its speed is for benchmarks/sampling.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from pixelcnn import GatedPixelCNN, sample
from pixelcnn.sampling import make_stepper, sample_uniforms
from test_sampling import explained_by_float_tie, teacher_forced_log_prob, tiny


def test_the_kernel_runs_in_the_interpreter_here():
    """conftest.py sets TRITON_INTERPRET=1 before Triton is imported; every test below relies on it."""
    from triton.runtime.interpreter import InterpretedFunction

    import pixelcnn.sampling.fused

    assert isinstance(pixelcnn.sampling.fused.pixel_step, InterpretedFunction)


CASES = [  # channels, image size, seed, temperature, batch, extra model config
    # 20 images: two programs of 16 rows, the second partly empty; with 16 x 16 weight tiles (below),
    # hidden 40 makes every layer several tiles and a partial one
    (1, (2, 3), 0, 1.0, 20, dict(hidden=40)),
    (3, (3, 5), 3, 1.3, 8, {}),
    (1, (4, 6), 1, 0.7, 5, dict(norm="batch")),
    (3, (4, 3), 2, 1.0, 6, dict(num_classes=3, blocks=3)),
    (1, (1, 1), 4, 1.0, 3, {}),
]


def case_model(channels, size, seed, extra, dtype=torch.float64):
    model = tiny(channels, size, dtype=dtype, seed=seed, **extra)
    for m in model.modules():  # eval-mode BatchNorm with non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("channels,size,seed,temperature,batch,extra", CASES)
def test_fused_equals_naive_float64(channels, size, seed, temperature, batch, extra, monkeypatch):
    if extra.get("hidden"):
        monkeypatch.setattr("pixelcnn.sampling.fused.BLOCK_K", 16)
        monkeypatch.setattr("pixelcnn.sampling.fused.BLOCK_N", 16)
    model = case_model(channels, size, seed, extra)
    labels = torch.arange(batch) % 3 if extra.get("num_classes") else None
    naive = sample(model, batch, seed=seed, temperature=temperature, labels=labels, sampler="naive", batch_size=batch)
    fused = sample(model, batch, seed=seed, temperature=temperature, labels=labels, sampler="fused", batch_size=batch)
    assert naive.images.float().std() > 10 or size == (1, 1), "random weights should give varied images"
    assert torch.equal(naive.images, fused.images)
    assert torch.allclose(naive.log_prob, fused.log_prob, atol=1e-9, rtol=0)
    assert torch.allclose(fused.log_prob, teacher_forced_log_prob(model, fused.images.long(), labels), atol=1e-9, rtol=0)


def test_fused_equals_naive_float32():
    model = tiny(3, (4, 5), dtype=torch.float32, seed=5)
    naive = sample(model, 12, seed=9, sampler="naive", batch_size=12)
    fused = sample(model, 12, seed=9, sampler="fused", batch_size=12)
    same = [k for k in range(12) if torch.equal(naive.images[k], fused.images[k])]
    for k in set(range(12)) - set(same):
        assert explained_by_float_tie(model, naive.images[k], fused.images[k], 9, k)
    assert len(same) >= 11
    assert torch.allclose(naive.log_prob[same], fused.log_prob[same], atol=1e-4, rtol=0)


def test_a_fused_stepper_reused_for_later_batches_starts_clean():
    """What CUDA graph replay relies on: one stepper runs batch after batch, each as if it were fresh."""
    model = case_model(3, (3, 4), 6, dict(num_classes=2))
    stepper = make_stepper(model, 4, torch.float64, torch.device("cpu"), "fused")
    for ids in ([0, 1, 2, 3], [4, 5, 6, 7]):
        labels = torch.tensor(ids) % 2
        u = sample_uniforms(6, ids, 3 * 3 * 4).view(4, 3, 4, 3)
        levels, log_prob = stepper.run(u, labels, 0.9)
        fresh = sample(model, ids=ids, seed=6, temperature=0.9, labels=labels, sampler="naive")
        assert torch.equal(levels.to(torch.uint8), fresh.images)
        assert torch.allclose(log_prob, fresh.log_prob, atol=1e-9, rtol=0)


def test_float32_products_use_tf32_only_where_torch_does():
    model, cpu = tiny(dtype=torch.float32), torch.device("cpu")
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    assert make_stepper(model, 2, torch.float32, cpu, "fused").meta["PRECISION"] == "ieee"
    try:
        matmul.fp32_precision = "tf32"  # torch's new setting: reading the legacy allow_tf32 now raises
        assert make_stepper(model, 2, torch.float32, cpu, "fused").meta["PRECISION"] == "tf32"
        assert make_stepper(model.double(), 2, torch.float64, cpu, "fused").meta["PRECISION"] == "ieee"
    finally:
        matmul.fp32_precision = before


def test_fused_refuses_what_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="PixelCNN only, not GatedPixelCNN"):
        sample(GatedPixelCNN(image_size=(3, 3), hidden=8, layers=1).double(), 1, sampler="fused")
    with pytest.raises(ValueError, match="at least one residual block"):
        sample(tiny(blocks=0), 1, sampler="fused")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="runs on a CUDA device, not cpu"):
        sample(tiny(), 1, sampler="fused")


def compiled_run(script: str) -> subprocess.CompletedProcess:
    """``script`` in a child process whose ``pixelcnn.sampling.fused`` compiles its kernel (no interpreter)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # conftest.py, imported there too, keeps it
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), tests, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", script], cwd=tests, env=env, capture_output=True, text=True)


SHARED_PER_BLOCK = {90: 227 * 1024, 86: 99 * 1024}  # H100; A10G (cluster.yaml's g5 nodes)
LAYER_LOOPS = 7  # _layer calls in pixel_step: input conv; reduce, 3x3 conv, expand (in the block loop); 2 head; output


@pytest.mark.slow
def test_kernel_compiles_for_an_h100_and_an_a10g():
    """Compiled ahead of time with Triton's own LLVM and ptxas (no GPU needed) for sm_90 and sm_86, as a
    launch would compile it (``benchmarks/fused_compile.py``): the kernel must lower for the reference
    model in each dtype, within each GPU's shared memory per block (a launch that needs more fails).
    What its speed rests on must hold too, for the default tiles: every layer's weight loads are
    pipelined (async copies issued ahead of the products that use them), bf16 and TF32 products run on
    tensor cores, and float32 and bf16 kernels spill no registers."""
    out = subprocess.run([sys.executable, "benchmarks/fused_compile.py", "--json"], cwd=REPO, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert len(report) == 8 and not [k for k in report if "error" in k], report
    for kernel in report:
        assert kernel["shared_bytes"] <= SHARED_PER_BLOCK[kernel["arch"]], kernel
        # A pipelined loop waits for its loads ahead of it and in it: at least two waits per layer's loop.
        assert kernel["async_waits"] >= 2 * LAYER_LOOPS, kernel
        if kernel["dtype"] == "bfloat16" or kernel["precision"] == "tf32":
            assert kernel["tensor_cores"], kernel
        if kernel["dtype"] != "float64":  # float64 is for checking, not for speed
            assert kernel["spill_bytes"] == 0, kernel
    print(json.dumps(report, indent=1))


CUDA_CHECK = """
import copy, torch
import pixelcnn.sampling.fused
from pixelcnn import PixelCNN, sample
from pixelcnn.sampling.graphs import GRAPHS, GraphedRun
from conftest import randomize
from test_sampling import explained_by_float_tie
torch.manual_seed(0)
for channels, size, extra in [(1, (7, 5), dict(hidden=40)), (3, (4, 3), dict(num_classes=3, norm="batch"))]:
    cpu = randomize(PixelCNN(in_channels=channels, image_size=size, hidden=extra.pop("hidden", 12), blocks=2,
                             **extra)).eval()
    labels = torch.arange(20) % 3 if cpu.config.num_classes else None
    reference = sample(cpu, 20, seed=1, labels=labels, batch_size=20)  # the CPU cached sampler, float32
    model = copy.deepcopy(cpu).cuda()
    for graph in (False, True, True, True):  # eager; then with graphs: run, capture, replay
        fused = sample(model, 20, seed=1, labels=labels, batch_size=20, sampler="fused", cuda_graph=graph)
        same = [k for k in range(20) if torch.equal(fused.images[k], reference.images[k])]
        for k in set(range(20)) - set(same):
            label = None if labels is None else labels[k]
            assert explained_by_float_tie(cpu, reference.images[k], fused.images[k], 1, k, label), k
        assert len(same) >= 18 and torch.allclose(fused.log_prob[same], reference.log_prob[same], atol=1e-4)
    assert any(isinstance(run, GraphedRun) for run in GRAPHS[model].runs.values())
    bf16 = sample(copy.deepcopy(model).bfloat16(), 20, seed=1, labels=labels, batch_size=20, sampler="fused")
    assert bf16.images.float().std() > 10 and torch.isfinite(bf16.log_prob).all()
assert type(pixelcnn.sampling.fused.pixel_step).__name__ == "JITFunction", "interpreted, not compiled"
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs a CUDA device")
def test_compiled_kernel_on_cuda_draws_the_cpu_images():
    """Compiled for the GPU (no interpreter), eager and as a CUDA graph, float32 and bf16."""
    out = compiled_run(CUDA_CHECK)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
