"""What both jobs share: storage URIs (local folder or S3), connecting to Ray, one-line errors.

S3 access uses the standard AWS credential chain only (environment, shared config, instance profile,
IRSA): no credential is ever taken from a flag, written to a file or logged. An S3-compatible endpoint
comes from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL``; the region from ``AWS_REGION`` /
``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import uuid
from functools import cached_property
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


class JobError(Exception):
    """A problem with the user's request: printed as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none (its help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """The jobs' flags: --help shows defaults; a bad flag is one ``error:`` line, exit status 2, like
    every other refusal (argparse would print its usage first). Flags are taken whole: a prefix such
    as ``--num-sample`` is refused, not read as ``--num-samples``."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:
        fail(f"{message} (see --help)")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def one_line(error: BaseException) -> str:
    """An I/O error's message on one line, cut to a length an error line can carry."""
    return " ".join(str(error).split())[:300]


def interrupted() -> None:
    """Ctrl-C: one line, and the shell's status for SIGINT. Every file a job writes is whole (checkpoints,
    part files), so the same command again resumes."""
    print("error: interrupted: rerun the same command to resume", file=sys.stderr, flush=True)
    raise SystemExit(130)


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 (never credentials): picklable, so workers can open the same storage."""

    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint: str | None = None, bucket: str | None = None) -> "S3Settings":
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None and endpoint is None and bucket:
            # Arrow does not follow S3's region redirects, and Ray nodes rarely set AWS_REGION: ask S3.
            try:
                region = pafs.resolve_s3_region(bucket)
            except OSError:
                region = None  # a missing bucket is reported by check_bucket, in one line
        return cls(endpoint or None, region)

    def filesystem(self) -> pafs.S3FileSystem:
        kwargs = {}
        if self.endpoint:
            url = urlparse(self.endpoint if "://" in self.endpoint else f"https://{self.endpoint}")
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        kwargs["region"] = self.region or "us-east-1"
        return pafs.S3FileSystem(**kwargs)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """PUT ``bucket/key`` unless it exists (S3's conditional write, If-None-Match: *, which Arrow's
        filesystem does not offer): whether this call created it."""
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = path.split("/", 1)
        endpoint = self.endpoint if not self.endpoint or "://" in self.endpoint else f"https://{self.endpoint}"
        try:
            # A session of its own: boto3's default one keeps the credentials it first found.
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=self.region or "us-east-1")
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False  # it exists, or another request's create of it is under way
            raise OSError(one_line(error)) from None
        except BotoCoreError as error:  # no credentials, endpoint unreachable, ...
            raise OSError(one_line(error)) from None


@dataclass(frozen=True)
class Storage:
    """A folder on a pyarrow filesystem: ``uri`` for people, ``(fs, path)`` for I/O."""

    uri: str
    path: str  # "bucket/prefix" on S3, an absolute path locally
    s3: S3Settings | None = None

    @cached_property
    def fs(self) -> pafs.FileSystem:
        return self.s3.filesystem() if self.s3 else pafs.LocalFileSystem()

    def child(self, name: str) -> "Storage":
        return Storage(f"{self.uri.rstrip('/')}/{name}", f"{self.path.rstrip('/')}/{name}", self.s3)

    def file(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def read(self, name: str) -> bytes | None:
        fs = self.fs
        if fs.get_file_info(self.file(name)).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(self.file(name)) as f:
            return f.read()

    def write(self, name: str, data: bytes) -> None:
        """Write a whole file so that readers never see a partial one.

        An S3 PUT is atomic already; locally we write a hidden temporary file and rename it.
        """
        fs, target = self.fs, self.file(name)
        if self.s3:
            with fs.open_output_stream(target) as f:
                f.write(data)
            return
        fs.create_dir(os.path.dirname(target), recursive=True)
        tmp = f"{os.path.dirname(target)}/.tmp-{uuid.uuid4().hex}-{os.path.basename(target)}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, target)

    def create(self, name: str, data: bytes) -> bool:
        """Write a whole file only if ``name`` does not exist yet: of two jobs racing to create it, exactly
        one does. Returns whether this call created it."""
        if self.s3:
            return self.s3.put_if_absent(self.file(name), data)
        target = self.file(name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{os.path.dirname(target)}/.tmp-{uuid.uuid4().hex}-{os.path.basename(target)}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, target)  # a hard link never replaces an existing file: an exclusive, whole create
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def list(self) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return self.fs.get_file_info(selector)


def open_storage(uri: str, endpoint: str | None = None) -> Storage:
    """A local folder or ``s3://bucket/prefix``; raises JobError on malformed URIs."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise JobError(f"storage URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return Storage(uri.rstrip("/"), path, S3Settings.from_env(endpoint, parsed.netloc))
    if parsed.scheme not in ("", "file"):
        raise JobError(f"unsupported storage URI {uri!r}: use a local folder or s3://bucket/prefix")
    path = os.path.abspath(os.path.expanduser(parsed.path if parsed.scheme else uri))
    return Storage(path, path)


def check_bucket(storage: Storage) -> None:
    """Fail fast, reading only, on a missing bucket, denied access or an unreachable endpoint."""
    if not storage.s3:
        return
    bucket = storage.path.split("/", 1)[0]
    try:
        info = storage.fs.get_file_info(bucket)
    except OSError as error:
        raise JobError(f"cannot reach {storage.uri}: {one_line(error)}") from None
    if info.type == pafs.FileType.NotFound:
        raise JobError(f"S3 bucket {bucket!r} does not exist (storage {storage.uri})")


def check_writable(storage: Storage) -> None:
    """``check_bucket``, then whether the folder takes a file: a probe, written and deleted. It leaves the
    folder behind (on S3 an empty folder marker), so call it only once the job is going to write."""
    check_bucket(storage)
    try:
        probe = f".write-probe-{uuid.uuid4().hex}"
        storage.write(probe, b"")
        storage.fs.delete_file(storage.file(probe))
    except OSError as error:
        raise JobError(f"cannot write to {storage.uri}: {one_line(error)}") from None


def init_ray(address: str | None) -> None:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``, as ``ray job submit`` sets), else
    start an in-process single-node Ray, so the same script runs on a laptop and on a cluster."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray gives workers the driver's script folder (jobs/) and working directory, not the repo root
        # the script put on its own sys.path: without it a job started from another folder could not
        # import `jobs` (whose Storage objects travel to the workers) or an uninstalled `pixelcnn`. The
        # in-process Ray's workers inherit this process's environment.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + [path for path in paths if path != root])
        ray.init(address="local", log_to_driver=True)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# A worker's error arrives as text: its tracebacks joined by these lines, the innermost first.
CHAINED_TRACEBACK_MARKERS = re.compile(
    r"^\s*(?:The above exception was the direct cause|During handling of the above exception).*$", re.MULTILINE)
# Ray's own wrappers around a user's error (Ray Data adds a UserCodeException with advice on retries).
RAY_WRAPPER = re.compile(r"^\s*ray\.(?:data\.)?exceptions\.\w+", re.MULTILINE)


def root_cause(error: BaseException) -> str:
    """One line naming what went wrong: the last line of the innermost error that says something (Ray
    Data raises an internal error "from" an empty ``SystemException()``). A worker's error text chains
    tracebacks: of those not raised by Ray itself, the last one's last line, the user's own message."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for cause in reversed(chain):
        parts = CHAINED_TRACEBACK_MARKERS.split(str(cause))
        parts = [part for part in parts if not RAY_WRAPPER.search(part)] or parts
        lines = [line.strip() for line in parts[-1].splitlines() if line.strip()]
        if lines:
            return lines[-1][:500]
    return type(error).__name__
