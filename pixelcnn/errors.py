"""The library's errors about its inputs: each message is one line naming the problem, so a job can print
it as its one ``error:`` line."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (data, a checkpoint): the message is one line naming the problem."""


class DataError(InputError):
    """A dataset that cannot be loaded."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """An error's message on one line, cut to a length an error line can carry."""
    return " ".join(str(error).split())[:limit]
