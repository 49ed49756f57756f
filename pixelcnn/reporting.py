"""What a run reports: the progress lines rank 0 prints, the run folder's metrics files and figures
(metrics.jsonl, curve.jsonl, metrics.png, sample grids), and the reduction of a window of steps across
workers into one point of the training curve."""

from __future__ import annotations

import json
import math

import torch

from .figures import grid_png, metrics_png
from .sampling import sample


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def report_files(history: list[dict], curve: list[dict]) -> dict[str, bytes]:
    """The run folder's record of a run, rewritten whole from the checkpoint's lists at each report (so a
    resumed run never lists a line twice): ``metrics.jsonl`` (one line per report), ``curve.jsonl`` (one
    line per point of the curve: every --log-every steps, each evaluation and each report) and
    ``metrics.png`` (the curve: train bits/dim, and test bits/dim where evaluated)."""
    return {"metrics.jsonl": jsonl(history), "curve.jsonl": jsonl(curve), "metrics.png": metrics_png(curve)}



def grid_name(step: int, steps_per_epoch: int) -> str:
    """The sample grid's file: after each epoch ``samples_epoch_NNN.png``, NNN the whole epochs done (as
    metrics' ``epoch``); a run that stops mid-epoch (--max-steps) names its last grid by its step."""
    if step % steps_per_epoch:
        return f"samples_step_{step:06d}.png"
    return f"samples_epoch_{step // steps_per_epoch:03d}.png"



class Progress:
    """What rank 0 prints: a progress line every ``--log-every`` steps and one line per report."""

    def __init__(self, total_steps: int, world_size: int, log):
        self.total_steps, self.world_size, self.log = total_steps, world_size, log

    def line(self, step: int, epoch: int, steps_per_epoch: int, recent: list, dims: int) -> None:
        loss = sum(w[0] for w in recent) / max(1, sum(w[1] for w in recent)) / dims / math.log(2)
        seconds = sum(w[2] for w in recent) / len(recent)
        eta = (self.total_steps - step) * seconds
        self.log(f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) epoch {epoch + 1} | loss "
                 f"{loss:.4f} bits/dim (this worker) | {sum(w[1] for w in recent) * self.world_size / max(1e-9, sum(w[2] for w in recent)):.1f} "
                 f"images/s | ETA {duration(eta)}", flush=True)

    @staticmethod
    def report(metrics: dict) -> str:
        train = metrics.get("train_bits_per_dim")
        return (f"report at step {metrics['step']}: train {train:.4f}, test {metrics['test_bits_per_dim']:.4f} bits/dim"
                if train is not None else f"report at step {metrics['step']}: test {metrics['test_bits_per_dim']:.4f} bits/dim") + \
            (" (done)" if metrics.get("done") else "") + " " + json.dumps(metrics)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def reduce_window(window: list, all_reduce_sum, dims: int, world_size: int, device) -> dict:
    """Training loss (bits/dim) and throughput over ``window`` ((loss sum in nats, images, seconds) per step),
    summed over all workers by ``all_reduce_sum``."""
    totals = torch.tensor(
        [sum(w[0] for w in window), sum(w[1] for w in window), sum(w[2] for w in window)], dtype=torch.float64,
        device=device,
    )
    loss_sum, count, seconds = all_reduce_sum(totals).tolist()
    if not count:
        return {}
    return {
        "train_bits_per_dim": loss_sum / (count * dims) / math.log(2),
        # each worker's seconds overlap: images/s = images / (mean seconds per worker)
        "images_per_s": count / (seconds / world_size),
    }



def sample_grid_png(model, count: int, seed: int) -> bytes:
    """A PNG grid of ``count`` samples (conditional models: classes in turn), 4x enlarged."""
    labels = torch.arange(count) % model.config.num_classes if model.config.num_classes else None
    return grid_png(sample(model, count, seed=seed, labels=labels, batch_size=count).images)
