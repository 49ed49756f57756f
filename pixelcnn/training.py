"""The training loop: maximum likelihood (cross-entropy per dimension) with AdamW, a step-based
learning-rate schedule and an exponential moving average (EMA) of the weights.

Distribution is applied from outside through ``Runtime`` (nanoGPT/torchtitan style): the loop asks it
for the data, to wrap the model (DDP), to sum metrics across workers, for a checkpoint to resume from,
and to publish metrics and checkpoints. ``Runtime`` itself is the single-process, local-folder version;
``jobs/train.py`` supplies the Ray Train one.

What a step computes does not depend on the number of workers. ``--batch-size`` is the global batch;
each worker takes its share of it (shares differ by at most one image) and weights its summed loss by
``workers / global batch``, so the gradient DDP averages is the one-worker gradient of the mean loss
over the global batch. With the data in memory (``InMemoryBatches``) the batches are a function of
(seed, epoch, step) alone: each epoch is a permutation seeded by (seed, epoch), cut into global batches,
the last one short, so every image is trained on once per epoch. A run that changes its worker count
(elastic training, or a resume on another cluster) therefore continues exactly as if it had not.

Resuming is exact: the learning rate is a function of the step alone (``learning_rate``), dropout
masks are drawn from a generator seeded by (seed, step, rank), and a checkpoint holds the raw
weights, the EMA weights and the optimizer state; so a run stopped at step k and resumed ends with
the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time

import torch

from .batches import Batches, InMemoryBatches, load_split
from .checkpoint import MODEL_FILE, checkpoint_dict, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import ImageData
from .files import write_atomically
from .images import class_count
from .likelihood import bits_per_dim, distribution_of, model_logits, nll_per_image
from .models import MODELS
from .reporting import Progress, grid_name, reduce_window, report_files, sample_grid_png
from .sampling.streams import derive_seed

# --- the runtime ---------------------------------------------------------------------------------


class Runtime:
    """Single process, one device, data in memory, artefacts in a local run folder. Subclass for
    distribution (``jobs/train.py``)."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str, device: str | torch.device = "cpu", log=print):
        self.run_dir = run_dir
        self.device = torch.device(device)
        self.log = log

    def load_data(self, cfg: TrainConfig) -> tuple[Batches, ImageData]:
        """(training batches, test data in memory)."""
        train_data, test_data = load_split(cfg, train=True), load_split(cfg, train=False)
        batches = InMemoryBatches(train_data, cfg.batch_size, cfg.seed, self.rank, self.world_size, self.device)
        batches.num_classes = max(train_data.num_classes, test_data.num_classes)  # own images: labels seen in either
        if cfg.conditional and batches.num_classes and cfg.own_images and not train_data.classes:  # a label column
            labels = torch.cat([train_data.labels, test_data.labels]).unique().tolist()
            batches.num_classes = class_count(labels, cfg.dataset)
        return batches, test_data

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def resume_state(self) -> dict | None:
        """The run folder's checkpoint, if any (a corrupt one is a ``CheckpointError``)."""
        path = os.path.join(self.run_dir, MODEL_FILE)
        return load_checkpoint(path) if os.path.exists(path) else None

    def publish(self, metrics: dict, checkpoint: dict | None, files: dict[str, bytes]) -> None:
        """Rank 0's report: ``files`` (metrics.jsonl, metrics.png, sample grids), then the model, each
        written whole; the model last, so a crash between them leaves files a resume rewrites."""
        if checkpoint is None:
            return
        for name, data in files.items():
            write_atomically(os.path.join(self.run_dir, name), data)
        save_checkpoint(os.path.join(self.run_dir, MODEL_FILE), checkpoint)


def schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The steps the learning-rate schedule spans: ``schedule_steps`` (fixed from ``--max-time``), else
    ``epochs`` x steps per epoch. ``max_steps`` does not change it: a run stopped early and resumed keeps
    its schedule."""
    return cfg.schedule_steps or cfg.epochs * steps_per_epoch


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``warmup_steps``, capped at a quarter of the schedule's steps. Runs at least four times as long as
    their warm-up keep it as asked."""
    return min(cfg.warmup_steps, schedule_steps(cfg, steps_per_epoch) // 4)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), a function of the step alone.

    Linear warm-up over ``warmup_steps()``, then "cosine": half a cosine from ``lr`` down to ~0 at the
    last of ``schedule_steps()`` (``max_steps`` only stops early), or "constant": ``lr`` times
    ``lr_decay`` per finished epoch.
    """
    warm = warmup_steps(cfg, steps_per_epoch)
    warmup = min(1.0, (step + 1) / warm) if warm else 1.0
    if cfg.schedule == "constant":
        return cfg.lr * warmup * cfg.lr_decay ** (step // steps_per_epoch)
    horizon = schedule_steps(cfg, steps_per_epoch) - warm
    progress = min(1.0, max(0.0, (step - warm) / max(1, horizon)))
    return cfg.lr * warmup * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """An exponential moving average of a model's weights, held in a copy of the model.

    Every worker keeps one and updates it after each optimizer step: DDP keeps the raw weights equal
    on all workers, so the averages are equal too and evaluation can stay sharded. The decay ramps up
    as ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ExponentialMovingAverage with
    num_updates): early on the average follows the fast-moving weights instead of staying near the
    random initialisation. It depends on the step alone, so a resumed run averages exactly the same.
    Buffers (BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step number ``step`` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        for average, buffer in zip(self.model.buffers(), model.buffers()):
            average.copy_(buffer)


def train(cfg: TrainConfig, runtime: Runtime) -> dict:
    """Train (or resume) per ``cfg``; returns the final metrics (with ``test_bits_per_dim``)."""
    log = runtime.log if runtime.rank == 0 else (lambda *a, **k: None)
    device = runtime.device
    batches, test_data = runtime.load_data(cfg)
    if cfg.conditional and not batches.num_classes:
        raise ValueError(f"--conditional needs labels, and {cfg.dataset} has none")
    steps_per_epoch = batches.steps_per_epoch
    state = runtime.resume_state()
    if cfg.max_time is not None and cfg.schedule_steps is None:  # (jobs/train.py measures in its driver)
        steps = state["training"]["config"].get("schedule_steps") if state is not None else None
        if steps is None:
            share = largest_share(cfg, runtime.world_size)
            steps, per_step = steps_in(cfg, share, device, batches.shape, batches.num_classes)
            log(budget_line(cfg, steps, per_step, share))
        cfg = dataclasses.replace(cfg, schedule_steps=steps)
    total_steps = schedule_steps(cfg, steps_per_epoch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    model, optimizer = new_model(cfg, batches.shape, batches.num_classes, device)
    step, history, curve = 0, [], []
    if state is not None:
        training = state["training"]
        # With EMA the checkpoint's model_state is the average; the raw weights the optimizer steps
        # travel in training["raw_state"].
        model.load_state_dict(training.get("raw_state", state["model_state"]))
        optimizer.load_state_dict(training["optimizer"])
        for group in optimizer.param_groups:
            # The stored hyperparameters are the writing run's; this run's flags win (a changed
            # --weight-decay, say). lr is set every step.
            group.update(optimizer.defaults)
        step, history = state["step"], list(training["history"])
        curve = list(training.get("curve", history))  # a checkpoint from before the curve: its reports
        log(f"resuming from step {step} with {runtime.world_size} worker{'s' * (runtime.world_size > 1)}")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = None
    if cfg.ema:
        ema = EMA(model, cfg.ema)
        if state is not None and "raw_state" in state["training"]:
            ema.model.load_state_dict(state["model_state"])
    # The weights evaluated, sampled and saved as the model: the average when there is one.
    final_model = ema.model if ema is not None else model
    train_model = runtime.prepare_model(model)
    if cfg.compile:
        train_model = torch.compile(train_model)  # after DDP wrapping, as DDP's docs recommend
    autocast = autocast_for(cfg, device)
    dims = math.prod(test_data.shape)

    def point(window: list, evaluated: bool) -> dict:
        """A point of the curve: the window since the last one (train bits/dim, images/s) and, when
        ``evaluated``, the test figures. ``epoch`` counts whole epochs done, as the sample grids do."""
        nonlocal trained
        trained += sum(w[2] for w in window)
        line = {
            "step": step, "epoch": step // steps_per_epoch, "world_size": runtime.world_size,
            "lr": optimizer.param_groups[0]["lr"], **reduce_window(window, runtime.all_reduce_sum, dims, runtime.world_size, device),
        }
        if evaluated:
            test_bpd = evaluate_sharded(final_model, test_data, cfg.eval_batch_size, runtime, autocast)
            line["test_bits_per_dim"] = test_bpd
            line["test_bits_per_dim_raw"] = (
                evaluate_sharded(model, test_data, cfg.eval_batch_size, runtime, autocast) if ema else test_bpd)
        # Seconds in the training loop (steps, evaluations, reports), summed over the run's starts.
        line["elapsed_s"] = round(elapsed + time.perf_counter() - loop_started, 3)
        # Of those, the seconds in training steps (rank 0's): what a budget of training time buys.
        line["train_s"] = round(trained, 3)
        return line

    window: list[tuple[float, int, float]] = []  # (loss sum in nats, images, seconds) since the last point
    progress = Progress(total_steps, runtime.world_size, log)
    elapsed, loop_started = (curve[-1].get("elapsed_s", 0.0) if curve else 0.0), time.perf_counter()
    trained = curve[-1].get("train_s", 0.0) if curve else 0.0
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        for levels, batch_labels, total in batches.epoch(epoch, offset):
            if step >= epoch_end:
                break
            started = time.perf_counter()
            if cfg.dropout:
                # Masks from (seed, step, rank), not from whatever the global generator went through
                # before: a resumed run draws the same masks as one that never stopped.
                torch.manual_seed(derive_seed(cfg.seed, 2, step, runtime.rank))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, steps_per_epoch)
            count = len(levels)
            if not count:  # a share of no images (a short last batch): a zero-weighted step keeps DDP in step
                levels, batch_labels = torch.zeros_like(test_data.images[:1]).to(device), torch.zeros(1, dtype=torch.long, device=device)
            nll = optimizer_step(cfg, train_model, model, optimizer, levels, batch_labels, total, runtime.world_size,
                                 autocast, weight=count > 0)
            step += 1
            if ema is not None:
                ema.update(model, step)
            window.append((float(nll.detach()), count, time.perf_counter() - started))
            at_epoch_end = step == epoch_end
            logged = step % cfg.log_every == 0 or at_epoch_end
            if logged:
                progress.line(step, epoch, steps_per_epoch, window, dims)
            reported = at_epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            evaluated = reported or (cfg.eval_every and step % cfg.eval_every == 0)
            if not (logged or evaluated):
                continue
            # Every rank reaches the same points (they depend on the step alone): the window's all-reduce
            # and the evaluation stay in step across workers.
            curve.append(point(window, evaluated))
            window = []
            if reported:
                # The report is the curve's point at this step: its train figure is the last window's.
                metrics = {**curve[-1], **({"done": True} if step == total_steps else {})}
                history.append(metrics)
                files, checkpoint = {}, None
                if runtime.rank == 0:
                    if at_epoch_end and cfg.grid_samples:
                        files[grid_name(step, steps_per_epoch)] = sample_grid_png(final_model, cfg.grid_samples, cfg.seed)
                    files.update(report_files(history, curve))
                    training = {"optimizer": optimizer.state_dict(), "history": history, "curve": curve,
                                "config": cfg.to_dict()}
                    if ema is not None:
                        training["raw_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                    checkpoint = checkpoint_dict(
                        final_model, step=step, epoch=step // steps_per_epoch, dataset=cfg.dataset, training=training,
                    )
                runtime.publish(metrics, checkpoint, files)
                log(progress.report(metrics), flush=True)
        if step < epoch_end:  # a stream that ran dry early (it cannot for data in memory)
            raise RuntimeError(f"the training data of epoch {epoch + 1} ended at step {step}, before {epoch_end}")
    return history[-1] if history else {"step": step, "done": True}



def new_model(cfg: TrainConfig, shape: tuple[int, int, int] | None, num_classes: int | None, device):
    """(the model at its initial weights, its optimizer) for ``cfg``'s run on data of ``shape``."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = MODELS[cfg.model](cfg.model_config(shape, num_classes)).to(device, getattr(torch, cfg.precision))
    # One parameter group, every tensor decayed alike (the masked-out kernel entries get no gradient,
    # so decay only shrinks values that are multiplied by zero anyway).
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def autocast_for(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp == "bf16" else contextlib.nullcontext()


def largest_share(cfg: TrainConfig, world_size: int) -> int:
    """The most images of a global batch one of ``world_size`` workers takes (what a step is timed on)."""
    return -(-cfg.batch_size // world_size)


def optimizer_step(cfg: TrainConfig, train_model, model, optimizer, levels, labels, total: int, world_size: int,
                   autocast, weight: float = 1.0) -> torch.Tensor:
    """One optimizer step on a worker's share of a global batch of ``total`` images (``train_model``: the
    model as wrapped for training, DDP's all-reduce included); returns the share's summed NLL in nats."""
    with autocast:
        nll, loss = share_loss(train_model, levels, labels, total, world_size, weight=weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return nll


def steps_in(cfg: TrainConfig, share: int, device, shape: tuple[int, int, int] | None = None,
             num_classes: int | None = None, timed: int = 3) -> tuple[int, float]:
    """(the optimizer steps that fit in ``cfg.max_time`` seconds, seconds per step): the median of ``timed``
    steps of this run's model on ``share`` random images (one worker's share of a batch) on ``device``,
    after one untimed step (allocation, kernel selection). Reading data, evaluations, reports and DDP's
    all-reduce are not in the figure: a run takes that much longer than its budget. ``shape`` and
    ``num_classes`` default to what ``cfg`` records of its data."""
    device = torch.device(device)
    config = cfg.model_config(shape, num_classes)
    shape, num_classes = (config.in_channels, *config.image_size), config.num_classes
    model, optimizer = new_model(cfg, shape, num_classes, device)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    autocast = autocast_for(cfg, device)
    levels = torch.randint(0, 256, (share, *shape), device=device)
    labels = torch.randint(0, max(1, num_classes), (share,), device=device)
    seconds = []
    for _ in range(timed + 1):
        started = time.perf_counter()
        optimizer_step(cfg, model, model, optimizer, levels, labels, share, 1, autocast)
        if ema is not None:
            ema.update(model, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    per_step = sorted(seconds[1:])[timed // 2]
    return max(1, int(cfg.max_time / per_step)), per_step


def budget_line(cfg: TrainConfig, steps: int, per_step: float, share: int) -> str:
    return f"--max-time {cfg.max_time:g} s buys {steps} steps ({per_step:.3g} s each, measured on {share} images)"


def share_loss(model, levels, labels, total: int, world_size: int, weight: float = 1.0):
    """(summed NLL in nats, the loss to step on) of one worker's share of a global batch of ``total`` images.

    DDP averages gradients over workers: weighting the share's summed NLL by workers / (total x dims) makes
    that average the gradient of the mean loss per dimension over the global batch, whatever the shares.
    """
    output = model_logits(model, levels, labels)
    nll = -distribution_of(model).log_prob(output.to(torch.promote_types(output.dtype, torch.float32)), levels.long()).sum()
    nll = nll * weight
    return nll, nll * (world_size / (total * math.prod(levels.shape[1:])))



@torch.no_grad()
def evaluate_sharded(model, data: ImageData, batch_size: int, runtime: Runtime, autocast=contextlib.nullcontext()) -> float:
    """Exact test bits/dim: every worker sums NLL over its share of the test set, then all-reduce."""
    was_training = model.training
    model.eval()
    indices = torch.arange(runtime.rank, len(data), runtime.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        levels = data.images[batch].to(runtime.device)
        with autocast:
            logits = model_logits(model, levels, data.labels[batch].to(runtime.device))
        total[0] += nll_per_image(logits, levels, distribution_of(model)).sum()
        total[1] += len(batch)
    model.train(was_training)
    nll, count = runtime.all_reduce_sum(total).tolist()
    return bits_per_dim(nll, int(count), math.prod(data.shape))
