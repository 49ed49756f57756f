"""Config fields that carry their own help text, so that a command line can be built from a config
dataclass (``jobs/cli.py``) and each option is declared once: its name, type, default and help here,
its checks in the config's ``__post_init__``.

``identity=True`` marks a field that defines what a run or an output *is*: a rerun into the same run
folder or output must keep it (the others, such as ``--epochs``, may change to extend a run).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

REQUIRED = dataclasses.MISSING


def option(default: Any = REQUIRED, help: str = "", *, identity: bool = False, choices=None,
           parse: Callable[[str], Any] | None = None, group: str | None = None, metavar: str | None = None):
    """A dataclass field with command-line metadata. ``parse`` turns the flag's text into the value
    (default: the field's type); ``group`` names its section in ``--help``."""
    metadata = {"help": help, "identity": identity, "choices": choices, "parse": parse, "group": group,
                "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def identity_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("identity")]


def identity_changes(config, stored: dict) -> list[tuple[str, Any, Any]]:
    """(field, stored value, ``config``'s value) for each identity field of ``config`` whose value differs
    from what ``stored`` (a run's config.json, an output's manifest) holds: compared as JSON gives them
    back, so a tuple equals its list."""
    changes = []
    for name in identity_fields(type(config)):
        now = getattr(config, name)
        if stored.get(name) != json.loads(json.dumps(now)):
            changes.append((name, stored.get(name), now))
    return changes
