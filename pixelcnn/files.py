"""Whole-file writes: a reader never sees half a file, whatever crashes."""

from __future__ import annotations

import os
import uuid
from typing import BinaryIO, Callable

MODEL_FILE = "model.pt"  # name of the checkpoint file inside a checkpoint or run folder


def write_atomically(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``data`` (bytes, or ``data(f)`` writing into ``f``) to a temporary file beside ``path``, then
    rename it onto ``path``: the file under its final name is always whole (the old one, or the new one)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
    # Created with mode 0666, so that the kernel applies the umask (and a folder's default ACL) as open()
    # does: tempfile.mkstemp's 0600 would make every model, metrics file and part file its owner's alone.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data) if isinstance(data, (bytes, bytearray, memoryview)) else data(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
