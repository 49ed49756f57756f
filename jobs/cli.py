"""Command lines built from config dataclasses: each flag is declared once, as a field with its help text
(``pixelcnn.options.option``), and checked once, by the config that owns it. Flags that several jobs take
live in the option groups below, which each job's request composes (``ClusterOptions`` in every job,
``ActorPoolOptions`` in the two bulk jobs).

A bad flag is one ``error:`` line, exit status 2, like every other refusal (argparse would print its
usage first); flags are taken whole (``--num-sample`` is refused, not read as ``--num-samples``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

from jobs.errors import JobError, fail
from pixelcnn.options import flag_name, option


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """Where a job runs: its Ray cluster and S3 endpoint (every job)."""

    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, else an in-process Ray)",
                                 group="cluster")
    wait_for_resources: bool = option(False, "wait for an autoscaler instead of failing when the cluster is too small",
                                      group="cluster")
    s3_endpoint: str | None = option(None, "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)", group="cluster")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActorPoolOptions(ClusterOptions):
    """The bulk jobs' model, output and actor pool: a model read from a checkpoint, run by a pool of actors
    that write Parquet part files exactly once (``jobs/outputs.py``)."""

    checkpoint: str = option(help="model: a run folder or checkpoint (folder or .pt), local or s3://")
    output: str = option(help="local folder or s3://bucket/prefix for the Parquet files")
    batch_size: int | None = option(None, "images per batch on one actor (default: 256; on GPU actors 4096 for the "
                                    "cached and fused samplers, 1024 for scoring)", group="actors")
    rows_per_file: int = option(10000, "rows per Parquet file (one actor task each); an output keeps the one it was "
                                "started with", group="actors")
    num_actors: int = option(1, "actors (at most one per file left to write)", group="actors")
    gpus_per_actor: float = option(0.0, "GPUs per actor; 0 runs CPU actors", group="actors")
    cpus_per_actor: float | None = option(None, "CPUs per actor (default: 1 with GPUs, else the cluster's CPUs / actors, "
                                          "leaving room for reading, encoding and writes)", group="actors")
    repair: bool = option(False, "delete part files that overlap others (left by writers of another layout), then "
                          "write what is missing")

    def default_batch_size(self) -> int:
        raise NotImplementedError  # each job's own: what its actors run fastest with on this device

    def __post_init__(self):
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", self.default_batch_size())
        for name in ("batch_size", "rows_per_file", "num_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.gpus_per_actor < math.inf:  # (NaN fails a comparison)
            raise ValueError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor is not None and not 0 < self.cpus_per_actor < math.inf:
            raise ValueError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none (its help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:
        fail(f"{message} (see --help)")


def add_options(parser: argparse.ArgumentParser, cls, *, title: str | None = None) -> None:
    """One flag per field of ``cls`` that has help text, in ``--help`` groups by the field's ``group``."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("help"):
            continue  # not a flag (set by the job itself)
        name = meta.get("group") or title
        target = parser if name is None else groups.setdefault(name, parser.add_argument_group(name))
        kind = _base_type(hints[f.name])
        kwargs = {"help": meta["help"], "dest": f.name}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta.get("parse") or kind
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        target.add_argument(flag_name(f.name), **kwargs)


def options_of(cls, args: argparse.Namespace, parser: argparse.ArgumentParser, **extra):
    """``cls`` from the parsed flags (and ``extra`` fields); its checks' ValueError is one error line."""
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("help")}
    try:
        return cls(**{name: getattr(args, name) for name in names}, **extra)
    except ValueError as error:
        parser.error(str(error))


def class_probs(text: str | None, classes: int) -> list[float]:
    """--label-probs (both bulk jobs): ``classes`` comma-separated weights, normalised; None: uniform."""
    if text is None:
        return [1.0 / classes] * classes
    try:
        probs = [float(v) for v in text.split(",")]
    except ValueError:
        raise JobError(f"--label-probs must be comma-separated numbers, got {text!r}") from None
    if len(probs) != classes or not all(0 <= p < math.inf for p in probs) or sum(probs) <= 0:  # NaN fails too
        raise JobError(f"--label-probs needs {classes} finite non-negative numbers with a positive sum")
    return [p / sum(probs) for p in probs]


def _base_type(hint):
    """int for ``int | None``, tuple for ``tuple[int, int] | None`` (parsed by the field's ``parse``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        hint = args[0]
    return typing.get_origin(hint) or hint
