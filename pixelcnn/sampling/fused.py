"""PixelCNN's cached pixel step fused into one Triton kernel: ``sample(..., sampler="fused")``.

Why. The cached sampler (``steppers.py``) computes one column of the network per pixel step, about
6 MFLOP per image for the reference model, in over a hundred small library ops. On a GPU each op is at
least one kernel, and even replayed from a CUDA graph a step then costs over a hundred kernel latencies,
while the arithmetic would take a few microseconds. This module runs the whole step (input conv, every
residual block, the head, the output layer and the inverse-CDF draw of the pixel) as one kernel launch.

How. One Triton program per tile of ``BLOCK_ROWS`` images. It walks the layers in order; each layer is
a small matrix product ``[tile, K] @ [K, N]`` done in ``BLOCK_K`` x ``BLOCK_N`` weight tiles, its input
read from and its output written to per-image scratch rows in global memory (they stay in L1/L2). A program's threads
share those rows, so every layer ends with a barrier (``tl.debug_barrier``) before the next reads them.
Weights are read by every program each step: that read, not the arithmetic, bounds a step, and it is the
same whatever the batch, so the rate grows with the batch until the GPU's SMs are all busy.

What it shares with the cached sampler. The input conv's cache is a ``CachedConv``; the blocks' 3x3
conv caches are laid out as ``CachedConv``'s, stacked into one tensor so the kernel finds block l at a
fixed stride. Rows start as there: the part of every 3x3 conv that reads the rows above is one batched
matrix product per row, outside the kernel.
The kernel computes what ``PixelCNNStepper.logits_at`` computes, in the same order, then draws as
``draw`` does (in float64, the same uniforms): under Triton's interpreter it draws the naive sampler's
images in float64 (``tests/test_fused.py``). Compiled, its sums run in another order (tiled products,
fused multiply-adds, tree reductions), so a draw within rounding of a CDF boundary may differ, as
between any two samplers in finite precision: ~1e-15 away in float64, ~1e-6 in float32.

Where it runs. On CUDA devices with Triton installed (PyTorch's CUDA builds bring it). On the CPU only
under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how
the tests check it on machines without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..models import PixelCNN
from .cache import CachedConv, Pointwise
from .steppers import Stepper

# Tiles (GPU tuning knobs; any values give the same results). A program streams every weight once per
# step, from L2, so a step's time is L2 latency unless enough bytes are in flight: BLOCK_K x BLOCK_N
# weight tiles, NUM_STAGES of them loaded ahead. Float32 products (without TF32) run on FMA units with
# whole tiles in registers and spill past 64x64 (ptxas, sm_90); bf16 and TF32 ones run on tensor cores
# and do not, up to 128x128 (benchmarks/fused_compile.py prints each choice's resources, no GPU needed).
# Not yet timed on a GPU: benchmarks/sampling.py --fused-tiles is for that.
BLOCK_ROWS = 16  # images per program: the smallest M of tl.dot (and of a bf16/TF32 tensor-core product)
BLOCK_K = 32  # weight tile [BLOCK_K, BLOCK_N] of every layer's product
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3  # weight tiles in flight per layer: its loads are pipelined (cp.async) this deep


@triton.jit
def _layer(a_ptr, a_stride, K, w_ptr, N, out_ptr, out_stride, rows, bias_ptr, bias_stride, scale_ptr, shift_ptr,
           res_ptr, RELU_IN: tl.constexpr, AFFINE: tl.constexpr, RESIDUAL: tl.constexpr, RELU_OUT: tl.constexpr,
           ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
           BLOCK_N: tl.constexpr):
    """``out = [relu](([relu] a) @ w + bias) [* scale + shift] [+ res]``, for the tile's ``rows`` images.

    ``a [rows, K]`` and ``out [rows, N]`` have row strides ``a_stride``/``out_stride``; ``w [K, N]`` is
    contiguous; ``bias`` has row stride ``bias_stride`` (0: one bias for every image); ``scale, shift
    [N]`` are an eval-mode BatchNorm, read only if ``AFFINE``; ``res`` is read only if ``RESIDUAL``,
    laid out like ``out``. Neither ``a`` nor ``res`` may be ``out``: threads read and write different
    elements, with no barrier between.
    """
    m = tl.arange(0, BLOCK_ROWS)
    m_ok = m < rows
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            a = tl.load(a_ptr + m[:, None] * a_stride + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if RELU_IN:
                a = tl.maximum(a, 0.0).to(a_ptr.dtype.element_ty)
            w = tl.load(w_ptr + k[:, None] * N + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC)
        mask = m_ok[:, None] & n_ok[None, :]
        out_type = out_ptr.dtype.element_ty
        bias = tl.load(bias_ptr + m[:, None] * bias_stride + n[None, :], mask=mask, other=0.0)
        y = (acc + bias.to(ACC)).to(out_type)
        if AFFINE:
            scale = tl.load(scale_ptr + n, mask=n_ok, other=1.0)
            shift = tl.load(shift_ptr + n, mask=n_ok, other=0.0)
            y = (y * scale[None, :] + shift[None, :]).to(out_type)
        if RESIDUAL:
            y = (tl.load(res_ptr + m[:, None] * out_stride + n[None, :], mask=mask, other=0.0) + y).to(out_type)
        if RELU_OUT:
            y = tl.maximum(y, 0.0).to(out_type)
        tl.store(out_ptr + m[:, None] * out_stride + n[None, :], y, mask=mask)


# One compiled kernel for every pixel: Triton would otherwise compile variants for special values of
# the position and for the alignment of the per-pixel views u[:, i, j, c] and levels[:, c, i, j].
@triton.jit(do_not_specialize=["j", "c"], do_not_specialize_on_alignment=["u_ptr", "level_ptr"])
def pixel_step(
    j, c, batch,
    # the input conv: its current row's buffer [B, cols, C] (taps in place), row term [B, W, 2h], weight, norm
    in_row_ptr, in_row_stride, in_term_ptr, in_term_stride, in_w_ptr, in_scale_ptr, in_shift_ptr,
    # the BLOCKS residual blocks, stacked: block l's tensors at l * its block stride
    red_w_ptr, red_b_ptr, s1_ptr, t1_ptr,
    conv_row_ptr, conv_row_block, conv_row_stride, conv_term_ptr, conv_term_block, conv_term_stride,
    conv_w_ptr, s2_ptr, t2_ptr, exp_w_ptr, exp_b_ptr, s3_ptr, t3_ptr,
    head_w_ptr, head_b_ptr, out_w_ptr, out_b_ptr,
    # per-image scratch rows: the residual stream [B, 2h] (x and y in turn), the 3x3 conv's output
    # [B, h], the logits [B, LEVELS_POW2]
    x_ptr, y_ptr, t_ptr, logits_ptr,
    # the draw: u[:, i, j, c], levels[:, c, i, j] (strided views), log_prob [B], level -> model input
    u_ptr, u_stride, temperature_ptr, level_ptr, level_stride, log_prob_ptr, input_values_ptr,
    C: tl.constexpr, IN_TAPS: tl.constexpr, HIDDEN: tl.constexpr, BLOCKS: tl.constexpr, LEVELS: tl.constexpr,
    LEVELS_POW2: tl.constexpr, NORM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pixel (current row, j), channel c, for one tile of images: every layer, then the draw."""
    H2: tl.constexpr = 2 * HIDDEN
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_ROWS  # first image of this tile
    rows = batch - r0
    x = x_ptr + r0 * H2
    t = t_ptr + r0 * HIDDEN
    y = y_ptr + r0 * H2
    # Input conv: taps = padded columns j .. j + IN_TAPS - 1 of the current row (the last is pixel j,
    # its channels >= c still zero), read in place; the rows above are in the row term.
    _layer(in_row_ptr + r0 * in_row_stride + j * C, in_row_stride, IN_TAPS * C, in_w_ptr, H2, x, H2, rows,
           in_term_ptr + r0 * in_term_stride + j * H2, in_term_stride, in_scale_ptr, in_shift_ptr, x,
           False, NORM, False, False, ACC, PRECISION, BLOCK_ROWS, BLOCK_K, BLOCK_N)
    tl.debug_barrier()
    conv_row = conv_row_ptr + r0 * conv_row_stride
    conv_term = conv_term_ptr + r0 * conv_term_stride + j * HIDDEN
    # Block l's weights and caches are l block strides on: the pointers step once per block.
    red_w, red_b, s1, t1, conv_w, s2, t2 = red_w_ptr, red_b_ptr, s1_ptr, t1_ptr, conv_w_ptr, s2_ptr, t2_ptr
    exp_w, exp_b, s3, t3 = exp_w_ptr, exp_b_ptr, s3_ptr, t3_ptr
    for _ in range(BLOCKS):
        # 1x1 reduce of relu(x), norm1, relu: written into the 3x3 conv's input at padded column j + 1
        _layer(x, H2, H2, red_w, HIDDEN, conv_row + (j + 1) * HIDDEN, conv_row_stride, rows, red_b, 0, s1, t1, x,
               True, NORM, False, True, ACC, PRECISION, BLOCK_ROWS, BLOCK_K, BLOCK_N)
        tl.debug_barrier()
        # 3x3 mask-B conv: row term (bias, class bias, rows above) + taps at padded columns j, j + 1; norm2
        _layer(conv_row + j * HIDDEN, conv_row_stride, H2, conv_w, HIDDEN, t, HIDDEN, rows,
               conv_term, conv_term_stride, s2, t2, t,
               False, NORM, False, False, ACC, PRECISION, BLOCK_ROWS, BLOCK_K, BLOCK_N)
        tl.debug_barrier()
        # 1x1 expand of relu(t), norm3, plus the residual stream x: the new stream, written to y
        _layer(t, HIDDEN, HIDDEN, exp_w, H2, y, H2, rows, exp_b, 0, s3, t3, x,
               True, NORM, True, False, ACC, PRECISION, BLOCK_ROWS, BLOCK_K, BLOCK_N)
        tl.debug_barrier()
        x, y = y, x
        conv_row += conv_row_block
        conv_term += conv_term_block
        red_w, red_b, s1, t1 = red_w + H2 * HIDDEN, red_b + HIDDEN, s1 + HIDDEN, t1 + HIDDEN
        conv_w, s2, t2 = conv_w + H2 * HIDDEN, s2 + HIDDEN, t2 + HIDDEN
        exp_w, exp_b, s3, t3 = exp_w + HIDDEN * H2, exp_b + H2, s3 + H2, t3 + H2
    # Head: two 1x1 convs of relu(.), x -> y -> x.
    _layer(x, H2, H2, head_w_ptr, H2, y, H2, rows, head_b_ptr, 0, s1_ptr, t1_ptr, y,
           True, False, False, False, ACC, PRECISION, BLOCK_ROWS, BLOCK_K, BLOCK_N)
    tl.debug_barrier()
    _layer(y, H2, H2, head_w_ptr + H2 * H2, H2, x, H2, rows, head_b_ptr + H2, 0, s1_ptr, t1_ptr, x,
           True, False, False, False, ACC, PRECISION, BLOCK_ROWS, BLOCK_K, BLOCK_N)
    tl.debug_barrier()
    # Output layer, channel c's logits only: [rows, LEVELS] (scratch row width LEVELS_POW2).
    _layer(x, H2, H2, out_w_ptr + c * H2 * LEVELS, LEVELS, logits_ptr + r0 * LEVELS_POW2, LEVELS_POW2, rows,
           out_b_ptr + c * LEVELS, 0, s1_ptr, t1_ptr, x,
           True, False, False, False, ACC, PRECISION, BLOCK_ROWS, BLOCK_K, BLOCK_N)
    tl.debug_barrier()

    # The draw, as distributions.draw does it: float64 softmax at the temperature, inverse CDF against u,
    # log-prob at temperature 1.
    m = tl.arange(0, BLOCK_ROWS)
    m_ok = m < rows
    v = tl.arange(0, LEVELS_POW2)
    v_ok = v < LEVELS
    logits = tl.load(logits_ptr + (r0 + m)[:, None] * LEVELS_POW2 + v[None, :], mask=m_ok[:, None] & v_ok[None, :],
                     other=0.0).to(tl.float64)
    logits = tl.where(v_ok[None, :], logits, -float("inf"))
    z = logits / tl.load(temperature_ptr)
    p = tl.exp(z - tl.max(z, 1)[:, None])
    cdf = tl.cumsum(p / tl.sum(p, 1)[:, None], 1)
    u = tl.load(u_ptr + (r0 + m) * u_stride, mask=m_ok, other=0.0)
    level = tl.minimum(tl.sum(((cdf <= u[:, None]) & v_ok[None, :]).to(tl.int32), 1), LEVELS - 1)
    top = tl.max(logits, 1)
    log_z = tl.log(tl.sum(tl.exp(logits - top[:, None]), 1)) + top
    log_p = tl.sum(tl.where(v[None, :] == level[:, None], logits, 0.0), 1) - log_z
    tl.store(level_ptr + (r0 + m) * level_stride, level.to(tl.int64), mask=m_ok)
    log_prob = tl.load(log_prob_ptr + r0 + m, mask=m_ok, other=0.0)
    tl.store(log_prob_ptr + r0 + m, log_prob + log_p, mask=m_ok)
    # The drawn level, as the model's input value, into the input conv's buffer at pixel j, channel c.
    value = tl.load(input_values_ptr + level, mask=m_ok, other=0.0)
    tl.store(in_row_ptr + (r0 + m) * in_row_stride + (j + IN_TAPS - 1) * C + c, value, mask=m_ok)


def _affine(norm: torch.nn.Module, channels: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm2d as ``x * scale + shift`` (Identity: 1, 0)."""
    if not isinstance(norm, torch.nn.BatchNorm2d):
        return torch.ones(channels, dtype=dtype, device=device), torch.zeros(channels, dtype=dtype, device=device)
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    shift = norm.bias.double() - norm.running_mean.double() * scale
    return scale.to(dtype), shift.to(dtype)


_ACC = {torch.float64: tl.float64}  # every other dtype accumulates in float32


def _torch_matmul_uses_tf32() -> bool:
    """Whether torch's float32 CUDA matmuls may use TF32. The new setting first: reading the legacy
    ``allow_tf32`` after the new one was set raises."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return False


class FusedPixelCNNStepper(Stepper):
    """The cached sampler's loop (``Stepper.run``) with each pixel step one ``pixel_step`` launch."""

    def __init__(self, model: PixelCNN, batch: int, dtype, device):
        cfg = self.cfg = model.config
        self.dtype = dtype
        h, width, blocks = cfg.hidden, cfg.image_size[1], len(model.blocks)
        self.input_cache = CachedConv.masked(model.input_conv, batch, width, dtype, device)
        self.in_scale, self.in_shift = _affine(model.input_norm, 2 * h, dtype, device)
        # Every block's 3x3 conv cache laid out as a CachedConv's (rows: above, current; padded
        # columns), stacked over blocks: buffer [L, B, 2, 1, W + 2, h], row term [L, B, W, h].
        self.conv_buffer = torch.zeros(blocks, batch, 2, 1, width + 2, h, dtype=dtype, device=device)
        self.conv_term = torch.zeros(blocks, batch, width, h, dtype=dtype, device=device)
        # The current rows the kernel reads and writes: input [B, cols, C], blocks' [L, B, cols, h].
        self.in_row, self.conv_row = self.input_cache.buffer[:, -1, 0], self.conv_buffer[:, :, 1, 0]
        taps = [CachedConv.tap_weights(block.conv.masked_weight()[:, :, :2].to(dtype), pad_left=1)
                for block in model.blocks]
        self.conv_w = torch.stack([now for now, _ in taps])  # [L, 2h, h]: taps at columns j - 1, j
        self.conv_weight_above = torch.stack([above for _, above in taps])  # [L, 3h, h]
        self.conv_bias = torch.stack([block.conv.bias.to(dtype) for block in model.blocks])[:, None]
        self.label_embeddings = [block.label_bias for block in model.blocks] if cfg.num_classes else None
        self.label_bias = None
        reduce = [Pointwise(block.reduce, dtype) for block in model.blocks]
        expand = [Pointwise(block.expand, dtype) for block in model.blocks]
        self.reduce_w, self.reduce_b = torch.stack([p.weight for p in reduce]), torch.stack([p.bias for p in reduce])
        self.expand_w, self.expand_b = torch.stack([p.weight for p in expand]), torch.stack([p.bias for p in expand])
        # (scale, shift) of norm1, norm2, norm3, each stacked over blocks
        self.norms = [
            [torch.stack(part) for part in zip(*(_affine(getattr(block, name), width_, dtype, device)
                                                   for block in model.blocks))]
            for name, width_ in (("norm1", h), ("norm2", h), ("norm3", 2 * h))
        ]
        assert len(model.head) == 2, "the kernel runs PixelCNN's two head convs"
        head = [Pointwise(conv, dtype) for conv in model.head]
        self.head_w, self.head_b = torch.stack([p.weight for p in head]), torch.stack([p.bias for p in head])
        # Output weight [2h, levels * C] (column l C + c: level l of channel c) regrouped per channel.
        output = Pointwise(model.output_conv, dtype)
        self.out_w = output.weight.view(2 * h, cfg.levels, cfg.in_channels).permute(2, 0, 1).contiguous()
        self.out_b = output.bias.view(cfg.levels, cfg.in_channels).t().contiguous()

        self.levels_pow2 = triton.next_power_of_2(cfg.levels)
        # Per-image scratch rows (the kernel's x, y, t, logits).
        self.scratch = [torch.empty(batch, n, dtype=dtype, device=device)
                        for n in (2 * h, 2 * h, h, self.levels_pow2)]
        # The kernel's compile-time arguments: the same for every step.
        self.meta = dict(
            C=cfg.in_channels, IN_TAPS=self.input_cache.weight_now.shape[0] // cfg.in_channels, HIDDEN=h, BLOCKS=blocks,
            LEVELS=cfg.levels, LEVELS_POW2=self.levels_pow2, NORM=cfg.norm != "none", ACC=_ACC.get(dtype, tl.float32),
            # float32 products as torch does them: TF32 only where torch's own matmuls may use it.
            PRECISION="tf32" if dtype == torch.float32 and _torch_matmul_uses_tf32() else "ieee",
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            enable_fp_fusion=True,  # a*b+c as one FMA: Triton's default until 3.10, pinned here
        )
        self.grid = (triton.cdiv(batch, BLOCK_ROWS),)
        self.temperature = None

    def reset(self, labels: torch.Tensor | None) -> None:
        self.input_cache.reset()
        self.conv_buffer.zero_()
        if self.label_embeddings:  # a block's class bias is added after its 3x3 conv: into its row term
            self.label_bias = torch.stack([e(labels).to(self.dtype) for e in self.label_embeddings])[:, :, None]

    def start_row(self, i: int, levels: torch.Tensor) -> None:
        """``CachedConv.start_row`` for every block's 3x3 conv at once (and the input conv's own)."""
        self.input_cache.start_row(i)
        blocks, batch, _, _, cols, h = self.conv_buffer.shape
        if i:  # the current row becomes the row above; the new current row starts empty
            self.conv_buffer[:, :, 0] = self.conv_buffer[:, :, 1]
            self.conv_buffer[:, :, 1].zero_()
        # Row above [L, B, cols, h] -> windows [L, B, W, h, 3] -> [L, B W, 3 h] (tap-major, as weight_above)
        windows = self.conv_buffer[:, :, 0, 0].unfold(2, 3, 1).transpose(-1, -2).reshape(blocks, -1, 3 * h)
        torch.baddbmm(self.conv_bias, windows, self.conv_weight_above, out=self.conv_term.view(blocks, -1, h))
        if self.label_bias is not None:
            self.conv_term += self.label_bias

    def run(self, u: torch.Tensor, labels: torch.Tensor | None, temperature: float):
        # A device scalar, read by the kernel as float64 (a Python float argument would be float32).
        self.temperature = torch.full((), temperature, dtype=torch.float64, device=u.device)
        # Triton launches on the current device's current stream, not the tensors' device: make it
        # theirs, so a kernel on cuda:1 gets cuda:1 and follows the library ops of start_row.
        with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
            return super().run(u, labels, temperature)

    def step(self, i, j, c, u, levels, log_prob, input_values, temperature) -> None:
        pixel_step[self.grid](*self.kernel_args(i, j, c, u, levels, log_prob, input_values), **self.meta)

    def kernel_args(self, i, j, c, u, levels, log_prob, input_values) -> list:
        """``pixel_step``'s positional arguments for channel c of pixel (i, j) (``meta``: the rest)."""
        in_row, conv_row = self.in_row, self.conv_row
        level_view, u_view = levels[:, c, i, j], u[:, i, j, c]
        return [
            j, c, u.shape[0],
            in_row, in_row.stride(0), self.input_cache.row_term, self.input_cache.row_term.stride(0),
            self.input_cache.weight_now, self.in_scale, self.in_shift,
            self.reduce_w, self.reduce_b, *self.norms[0],
            conv_row, conv_row.stride(0), conv_row.stride(1), self.conv_term, self.conv_term.stride(0),
            self.conv_term.stride(1), self.conv_w, *self.norms[1], self.expand_w, self.expand_b, *self.norms[2],
            self.head_w, self.head_b, self.out_w, self.out_b,
            *self.scratch,
            u_view, u_view.stride(0), self.temperature, level_view, level_view.stride(0), log_prob, input_values,
        ]
