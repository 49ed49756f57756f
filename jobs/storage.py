"""Where jobs read and write: a local folder or ``s3://bucket/prefix`` (``open_storage``), the checks
before a job writes, and reading a checkpoint from either.

S3 access uses the standard AWS credential chain only (environment, shared config, instance profile,
IRSA): no credential is ever taken from a flag, written to a file or logged. An S3-compatible endpoint
comes from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL``; the region from ``AWS_REGION`` /
``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlparse

import pyarrow.fs as pafs

from jobs.errors import JobError
from pixelcnn.errors import one_line
from pixelcnn.files import MODEL_FILE, write_atomically


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

    def client(self):
        """A boto3 S3 client of its own session (boto3's default one keeps the credentials it first found),
        for what Arrow's filesystem does not offer: conditional writes."""
        import boto3

        endpoint = self.endpoint if not self.endpoint or "://" in self.endpoint else f"https://{self.endpoint}"
        return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=self.region or "us-east-1")

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """PUT ``bucket/key`` unless it exists (If-None-Match: *): whether this call created it."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = path.split("/", 1)
        try:
            self.client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
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

    @property
    def where(self) -> str:
        """The storage and, on S3, the endpoint: what an I/O error names."""
        return f"{self.uri} (endpoint {self.s3.endpoint})" if self.s3 and self.s3.endpoint else self.uri

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
        """Write a whole file so that readers never see a partial one (an S3 PUT is atomic already)."""
        if self.s3:
            with self.fs.open_output_stream(self.file(name)) as f:
                f.write(data)
        else:
            write_atomically(self.file(name), data)

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

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.file(name))

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
        raise JobError(f"cannot reach {storage.where}: {one_line(error)}") from None
    if info.type == pafs.FileType.NotFound:
        raise JobError(f"S3 bucket {bucket!r} does not exist (storage {storage.uri})")


def check_writable(storage: Storage) -> None:
    """Whether the folder takes a file (after ``check_bucket``, which every job calls first, reading only): a
    probe, written and deleted. It leaves the folder behind (on S3 an empty folder marker), so call it only
    once the job is going to write."""
    try:
        probe = f".write-probe-{uuid.uuid4().hex}"
        storage.write(probe, b"")
        storage.fs.delete_file(storage.file(probe))
    except OSError as error:
        raise JobError(f"cannot write to {storage.where}: {one_line(error)}") from None


def read_checkpoint(uri: str, endpoint: str | None) -> tuple[str, bytes]:
    """The checkpoint's bytes from a run folder, checkpoint folder or .pt file, local or on S3."""
    storage = open_storage(uri, endpoint)
    candidates = [] if storage.path.endswith(".pt") else [(storage, MODEL_FILE)]  # a run or checkpoint folder
    if "/" in storage.path.strip("/"):  # or the checkpoint file itself, whatever its name
        parent, name = storage.uri.rsplit("/", 1)
        candidates.append((open_storage(parent, endpoint), name))
    try:
        for folder, name in candidates:
            data = folder.read(name)
            if data is not None:
                return f"{folder.uri}/{name}", data
    except OSError as error:
        raise JobError(f"cannot read checkpoint {storage.where}: {one_line(error)}") from None
    raise JobError(f"checkpoint not found: {storage.uri} (neither a checkpoint file nor a folder holding {MODEL_FILE})")
