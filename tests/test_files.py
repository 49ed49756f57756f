"""pixelcnn/files.py: whole-file writes that come out with the permissions open() would give them."""

import os
import stat

import pytest

from pixelcnn.files import write_atomically


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=oct)
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "model.pt", b"whole")
        write_atomically(tmp_path / "metrics.jsonl", lambda f: f.write(b"{}\n"))
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(previous)
    for name in ("model.pt", "metrics.jsonl"):
        mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
        assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode), (name, oct(mode))
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "model.pt", "plain"]  # no temporary left
