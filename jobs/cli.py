"""Command lines built from config dataclasses: each flag is declared once, as a field with its help text
(``pixelcnn.options.option``), and checked once, by the config that owns it.

A bad flag is one ``error:`` line, exit status 2, like every other refusal (argparse would print its
usage first); flags are taken whole (``--num-sample`` is refused, not read as ``--num-samples``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

from jobs.common import JobError, fail
from pixelcnn.options import flag_name


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
