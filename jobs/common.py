"""What the jobs share: storage URIs (local folder or S3), connecting to Ray, one-line errors.

S3 access uses the standard AWS credential chain only (environment, shared config, instance profile,
IRSA): no credential is ever taken from a flag, written to a file or logged. An S3-compatible endpoint
comes from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL``; the region from ``AWS_REGION`` /
``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import uuid
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pixelcnn.errors import InputError, one_line
from pixelcnn.files import write_atomically


class JobError(Exception):
    """A problem with the user's request: printed as one line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM (``ray job stop``, Kubernetes): handled like Ctrl-C."""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def stopped(status: int) -> None:
    """Ctrl-C (130) or SIGTERM (143): one line, and the shell's status for the signal. Every file a job
    writes is whole (checkpoints, part files), so the same command again resumes."""
    what = "interrupted" if status == 130 else "terminated"
    print(f"error: {what}: rerun the same command to resume", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _terminate(signum, frame):
    raise Terminated()


class _Interrupt:
    """Ctrl-C's handler: KeyboardInterrupt, raised again every second until the job has stopped. Python
    drops an exception raised while the main thread runs a finaliser (a Ray driver runs many: object
    references), so one Ctrl-C can be lost while Ray Data executes."""

    def __init__(self):
        self.pressed, self.handled = threading.Event(), threading.Event()

    def __call__(self, signum, frame):
        if not self.pressed.is_set():
            self.pressed.set()
            threading.Thread(target=self._repeat, daemon=True).start()
        raise KeyboardInterrupt

    def _repeat(self):
        while not self.handled.wait(1.0):
            os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def one_error_line(what: str, s3_endpoint: str | None = None):
    """Run a job's body so that whatever stops it ends in one ``error:`` line: a refusal (exit 2), Ctrl-C
    (130), SIGTERM (143), or a failure in Ray, a worker or the driver, named by its root cause (exit 2;
    ``PIXELCNN_DEBUG=1`` re-raises it with its whole traceback instead), and by the S3 endpoint when S3
    could not be reached. Ray is shut down either way."""

    interrupt = _Interrupt()
    previous = signal.signal(signal.SIGTERM, _terminate), signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    except (JobError, InputError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        interrupt.handled.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ray's shutdown below is short; let it finish
        stopped(130)
    except Terminated:
        stopped(143)
    except SystemExit:
        raise
    except Exception as error:
        if os.environ.get("PIXELCNN_DEBUG") == "1":
            raise
        cause = root_cause(error)
        if UNREACHABLE.search(cause):  # S3 went away mid-run: say where it was
            endpoint = S3Settings.from_env(s3_endpoint).endpoint or "AWS's default S3 endpoint"
            cause = f"S3 at {endpoint} could not be reached: {cause}"
        fail(f"{what} failed: {cause} (PIXELCNN_DEBUG=1 shows the traceback)")
    finally:
        interrupt.handled.set()
        shutdown_ray()
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


# --- storage -------------------------------------------------------------------------------------


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
    """``check_bucket``, then whether the folder takes a file: a probe, written and deleted. It leaves the
    folder behind (on S3 an empty folder marker), so call it only once the job is going to write."""
    check_bucket(storage)
    try:
        probe = f".write-probe-{uuid.uuid4().hex}"
        storage.write(probe, b"")
        storage.fs.delete_file(storage.file(probe))
    except OSError as error:
        raise JobError(f"cannot write to {storage.where}: {one_line(error)}") from None


# --- Ray -----------------------------------------------------------------------------------------


def init_ray(address: str | None) -> None:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``, as ``ray job submit`` sets), else
    start an in-process single-node Ray, so the same script runs on a laptop and on a cluster."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as error:
            refused = authentication_refused(address, error)
            if refused:
                raise JobError(refused) from None
            raise
    else:
        # Ray gives workers the driver's script folder (jobs/) and working directory, not the repo root
        # the script put on its own sys.path: without it a job started from another folder could not
        # import `jobs` (whose Storage objects travel to the workers) or an uninstalled `pixelcnn`. The
        # in-process Ray's workers inherit this process's environment.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        paths = [path for path in os.environ.get("PYTHONPATH", "").split(os.pathsep) if path]
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + [path for path in paths if path != root])
        ray.init(address="local", log_to_driver=True)
    # ray.init puts in its own SIGTERM handler (exit at once, or tear the local node down): ours makes it
    # one error line like Ctrl-C, after which Ray is shut down all the same.
    signal.signal(signal.SIGTERM, _terminate)


def authentication_refused(address: str, error: BaseException) -> str | None:
    """The one line for a cluster that refused this job's authentication (never the token itself), or
    None if ``error`` is something else. Ray reads RAY_AUTH_MODE and a token from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order."""
    import ray.exceptions

    text = f"{error} {error.__cause__ or ''}"
    if not (isinstance(error, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in text):
        return None
    source = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
              f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})" if os.environ.get("RAY_AUTH_TOKEN_PATH") else
              "~/.ray/auth_token" if os.path.exists(os.path.expanduser("~/.ray/auth_token")) else None)
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return (f"the Ray cluster at {address} requires token authentication and this job sent no token: set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")
    if source is None:
        return (f"the Ray cluster at {address} requires an authentication token and none was found: set RAY_AUTH_TOKEN "
                "or RAY_AUTH_TOKEN_PATH to the cluster's token")
    return f"the Ray cluster at {address} refused the authentication token from {source}: it is not the cluster's token"


def shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


# What Arrow's and boto3's S3 clients say when the endpoint does not answer.
UNREACHABLE = re.compile(r"NETWORK_CONNECTION|Could(?: not|n't) connect|Connection refused|EndpointConnectionError|"
                         r"curlCode: (?:6|7|28)\b", re.IGNORECASE)
# A worker's error arrives as text: its tracebacks joined by these lines, the innermost first.
CHAINED_TRACEBACK_MARKERS = re.compile(
    r"^\s*(?:The above exception was the direct cause|During handling of the above exception).*$", re.MULTILINE)
# Ray's own wrappers around a user's error (Ray Data adds a UserCodeException with advice on retries).
RAY_WRAPPER = re.compile(r"^\s*ray\.(?:data\.)?exceptions\.\w+", re.MULTILINE)
# Lines Ray Data appends to an I/O error it retried: the error itself is on the line above them.
RAY_RETRY_ADVICE = re.compile(r"^\s*(?:Failed to .+ after \d+/\d+ attempts \(total backoff|To change retry attempts|"
                              r"This looks like an AWS S3 permissions error)")


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
        lines = [line.strip() for line in parts[-1].splitlines() if line.strip() and not RAY_RETRY_ADVICE.match(line)]
        if lines:
            return lines[-1][:500]
    return type(error).__name__
