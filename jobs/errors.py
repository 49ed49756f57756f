"""How a job fails: ``JobError`` (a problem with the request: one line, exit status 2), the one line
for Ctrl-C and SIGTERM, and the root cause of an error from Ray, a worker or S3, in one line."""

from __future__ import annotations

import re
import sys


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


def raise_terminated(signum, frame):
    """A SIGTERM handler: the job stops as it does for Ctrl-C, in one line."""
    raise Terminated()


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
