"""Build a trimmed Ray for a GPU machine that has no Ray and no registry, small enough to carry there.

    .venv/bin/python benchmarks/ray_for_gpu.py          # -> .whl/ray-gpu/ (wheels), .data/mnist-gz/ (MNIST .gz)

Run it on a machine that reaches PyPI. Ray 2.60's cp312 wheel is 79 MB, over the 64 MiB one run on
a lent GPU machine can carry; 32 MB of it is ``ray/jars`` (Java workers, unused here) and 3 MB the
dashboard's web client (a browser UI; the jobs start no dashboard they need). This script downloads
the wheel with pip, drops those two folders, rewrites RECORD without their lines (pip refuses a wheel
whose RECORD names files it lacks) and repacks it under its own name, so ``pip install --no-index
--find-links .whl/ray-gpu 'ray[data,train]==2.60.0'`` finds it there. Beside it go the dependencies of
Ray core, Data and Train that the GPU image lacks (KINDS.md's package list in the device tool's notes:
jsonschema, referencing, rpds-py, jsonschema-specifications, tensorboardX, pydantic, pydantic-core,
annotated-types, typing-inspection), pinned to the versions this project's CPU venv runs, plus two
small fallbacks that image has in unknown versions (attrs, typing-extensions: pip takes them only if
the installed ones are too old). It also copies MNIST's four .gz files (11 MB) for the GPU check's
Ray Train row. ``benchmarks/gpu_check.py`` installs the wheels when ``import ray`` fails.

Both output folders are ignored by git (``/.whl/`` and ``/.data/`` in .gitignore): carry them with
``carry=[".whl/ray-gpu", ".data/mnist-gz"]``. docs/gpu.md has the whole story.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_VERSION = "2.60.0"
# What the trimmed wheel leaves out: Java workers, and the dashboard's prebuilt browser client.
DROP = ("ray/jars/", "ray/dashboard/client/build/")
# Ray's needs (core: jsonschema; train/tune: pydantic, tensorboardX) that the GPU image lacks, pinned
# to what the CPU venv runs (pydantic pins its core exactly; a mismatch would not install).
NEEDED = {
    "jsonschema": "4.26.0", "referencing": "0.37.0", "rpds-py": "2026.9.1", "jsonschema-specifications": "2025.9.1",
    "tensorboardX": "2.6.5",
    "pydantic": "2.14.4", "pydantic-core": "2.50.5", "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
}
FALLBACKS = {"attrs": "26.1.0", "typing-extensions": "4.16.0"}  # on the image already, versions unknown
# manylinux tags pip matches exactly: the GPU machine's glibc takes any of these.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")
CARRY_LIMIT = 64 * 2**20  # one run's working tree, carried folders included


def pip_download(dest: str, python_version: str, requirements: list[str]) -> None:
    """Binary wheels for another interpreter (cpXY, manylinux x86-64), no dependencies resolved."""
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", dest,
           "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "none"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + ["--platform", "any"] + requirements, check=True)


def record_name(wheel: zipfile.ZipFile) -> str:
    """The wheel's own RECORD (top-level .dist-info; Ray vendors packages with RECORDs of their own)."""
    return next(n for n in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def trim_wheel(src: str, dest: str, drop: tuple[str, ...] = DROP) -> tuple[int, int]:
    """Copy wheel ``src`` to ``dest`` without the entries under ``drop`` and without their RECORD lines.
    Returns (entries dropped, entries kept)."""
    dropped = kept = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
        record = record_name(zin)
        for info in zin.infolist():
            if info.filename.startswith(drop):
                dropped += 1
                continue
            data = zin.read(info)
            if info.filename == record:
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if not line.startswith(drop)) + "\n").encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)  # keeps names, dates, modes
            kept += 1
    return dropped, kept


def check_wheel(path: str) -> None:
    """Every file in the wheel is in its RECORD with the right hash, and every RECORD line is a file."""
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist()) - {n for n in z.namelist() if n.endswith("/")}
        record = record_name(z)
        rows = [line.split(",") for line in z.read(record).decode().splitlines() if line]
        listed = {row[0]: row[1] for row in rows}
        if set(listed) != names:
            raise SystemExit(f"{path}: RECORD and files differ: {sorted(set(listed) ^ names)[:5]}")
        for name, digest in listed.items():
            if digest and record_hash(z.read(name)) != digest:
                raise SystemExit(f"{path}: {name} does not match its RECORD hash")


def copy_mnist(src: str, dest: str) -> list[str]:
    """MNIST's four .gz files (torchvision's MNIST/raw, found anywhere under ``src``) -> dest/MNIST/raw."""
    found = {}
    for root, _, files in os.walk(src):
        for name in files:
            if name in MNIST_FILES:
                found.setdefault(name, os.path.join(root, name))
    missing = set(MNIST_FILES) - set(found)
    if missing:
        raise SystemExit(f"MNIST: {', '.join(sorted(missing))} not found under {src} (--mnist-from)")
    raw = os.path.join(dest, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in MNIST_FILES:
        shutil.copyfile(found[name], os.path.join(raw, name))
    return [os.path.join(raw, name) for name in MNIST_FILES]


def mb(n: int) -> str:
    return f"{n / 1e6:6.1f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, ".whl", "ray-gpu"), help="folder for the wheels (emptied first)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (3.12 on the lent H100/H200)")
    p.add_argument("--ray-version", default=RAY_VERSION)
    p.add_argument("--mnist-from", default=os.path.join(REPO, "..", "shared", "data", "mnist"),
                   help="a folder holding MNIST's raw .gz files ('' to skip)")
    p.add_argument("--mnist-out", default=os.path.join(REPO, ".data", "mnist-gz"))
    args = p.parse_args()
    tag = "cp" + args.python_version.replace(".", "")

    os.makedirs(args.out, exist_ok=True)
    for old in os.listdir(args.out):  # one version of each package, or pip stops the whole install
        if old.endswith(".whl"):
            os.remove(os.path.join(args.out, old))
    with tempfile.TemporaryDirectory() as tmp:
        pip_download(tmp, args.python_version, [f"ray=={args.ray_version}"])
        (original,) = [f for f in os.listdir(tmp) if f.startswith("ray-")]
        trimmed = os.path.join(args.out, original)  # same name: pip's resolver finds it as ray==<version>
        dropped, kept = trim_wheel(os.path.join(tmp, original), trimmed)
        check_wheel(trimmed)
        print(f"{original}: {mb(os.path.getsize(os.path.join(tmp, original)))} -> {mb(os.path.getsize(trimmed))} "
              f"({dropped} entries under {', '.join(DROP)} dropped, {kept} kept, RECORD checked)")
    pip_download(args.out, args.python_version, [f"{n}=={v}" for n, v in {**NEEDED, **FALLBACKS}.items()])

    files = sorted(os.path.join(args.out, f) for f in os.listdir(args.out))
    if args.mnist_from:
        files += copy_mnist(args.mnist_from, args.mnist_out)
    total = 0
    for path in files:
        size = os.path.getsize(path)
        total += size
        print(f"{mb(size)}  {os.path.relpath(path, REPO)}")
    print(f"{mb(total)}  in all ({total / 2**20:.1f} MiB of the {CARRY_LIMIT // 2**20} MiB a run carries, for {tag})")
    if total > CARRY_LIMIT:
        raise SystemExit("over the carry limit")
    print(f'carry: ["{os.path.relpath(args.out, REPO)}"' + (f', "{os.path.relpath(args.mnist_out, REPO)}"]'
                                                              if args.mnist_from else "]"))


if __name__ == "__main__":
    main()
