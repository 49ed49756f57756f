"""A job's session with Ray: connect to the cluster or start an in-process Ray (``init_ray``), and run
the job's body so that whatever stops it ends in one ``error:`` line, with Ray shut down
(``one_error_line``)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading

from jobs.errors import UNREACHABLE, JobError, Terminated, fail, raise_terminated, root_cause, stopped
from jobs.storage import S3Settings
from pixelcnn.errors import InputError


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
    previous = signal.signal(signal.SIGTERM, raise_terminated), signal.signal(signal.SIGINT, interrupt)
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
        if debugging():
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


def debugging() -> bool:
    """``PIXELCNN_DEBUG=1``: every log line Ray writes, and a failure's whole traceback."""
    return os.environ.get("PIXELCNN_DEBUG") == "1"


def init_ray(address: str | None) -> None:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``, as ``ray job submit`` sets), else
    start an in-process single-node Ray, so the same script runs on a laptop and on a cluster. Ray's INFO
    lines are left out unless ``PIXELCNN_DEBUG=1``: a user reads the job's own lines, Ray's warnings and
    Ray Data's progress bars. (Ray Train's workers and controller: ``log_level`` in its RunConfig.)"""
    import ray.data

    quiet_ray_logs(log_level())
    if not debugging():
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(not_the_token_notice)
        # A worker that reads a dataset logs its progress (left out, as above) instead of sending tqdm bars
        # to this console. Datasets carry the driver's DataContext to the workers.
        ray.data.DataContext.get_current().use_ray_tqdm = False
    options = dict(log_to_driver=True, logging_level=log_level())
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        refused = refused_at_once(address)
        if refused:
            raise JobError(refused)
        try:
            ray.init(address=address, **options)
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
        ray.init(address="local", **options)
    if not debugging():
        drop_ray_notices()
    # ray.init puts in its own SIGTERM handler (exit at once, or tear the local node down): ours makes it
    # one error line like Ctrl-C, after which Ray is shut down all the same.
    signal.signal(signal.SIGTERM, raise_terminated)


# Lines Ray's workers print that are no error of the job's (they stay in the session's logs):
# - Ray Train's controller logs this one at ERROR level for its PreemptionWatcher actor in every run. (The
#   driver's own C++ logs the same for a Ray Data actor pool, straight to its stderr: that one is still shown.)
# - On a cluster started without its dashboard (``ray start --include-dashboard=false``), Ray Train's
#   PlacementGroupCleaner asks the State API, which the dashboard serves, every few seconds of every run, and
#   warns each time that it could not. (It would remove a run's placement group if the run's controller died.)
RAY_NOTICES = re.compile(r"core_worker\.cc:\d+: Actor with class name: '[^']+' and ID: '\w+' has constructor arguments "
                         r"in the object store and max_restarts > 0|"
                         r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable")


def drop_ray_notices() -> None:
    """Leave RAY_NOTICES' lines out of the console lines Ray forwards from its workers to this driver. (Ray's
    dispatcher of those lines is not public API: without it, the lines are shown.)"""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def without_notices(handler):
        def handle(data: dict):
            lines = [line for line in data.get("lines", []) if not RAY_NOTICES.search(line)]
            if lines or not data.get("lines"):
                handler({**data, "lines": lines})
        return handle

    for name, handler in list(getattr(dispatcher, "handlers", [])):
        if name == "ray_print_logs":  # the handler that prints them (ray.init(log_to_driver=True))
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, without_notices(handler))


def not_the_token_notice(record: logging.LogRecord) -> bool:
    """A local Ray turns token authentication on each time, and says so: left out (its warning that
    authentication is off stays)."""
    return not record.getMessage().startswith("Token authentication is enabled")


def log_level() -> str:
    """The console level of Ray's own logs in this job's processes: WARNING, INFO with PIXELCNN_DEBUG=1."""
    return "INFO" if debugging() else "WARNING"


def quiet_ray_logs(level: str) -> None:
    """Ray Data's console lines at ``level`` in this process: at WARNING its INFO lines (plans, progress
    logged where there is no terminal) are left out, its full log stays in the session's ray-data.log, and
    in a terminal its progress is still drawn by tqdm as bars."""
    import ray.data  # configures the "ray.data" logger, whose console handler is set below

    for handler in logging.getLogger(ray.data.__name__).handlers:
        if isinstance(handler, logging.StreamHandler):  # the console (its file handler is not a stream's)
            handler.setLevel(level)


def refused_at_once(address: str) -> str | None:
    """The one line for a cluster that refuses this job's token, asked once before ``ray.init``: Ray retries
    a connection for ~20 s (for a cluster that is still starting), and a refused token never heals. Any
    other outcome, or no answer within 2 s, is left to ``ray.init``."""
    if "://" in address or ":" not in address:  # Ray Client, "auto": ray.init resolves those
        return None
    if os.environ.get("RAY_AUTH_MODE") == "token" and token_source() is None:
        return None  # ray.init refuses that at once (Ray's client aborts the process on it)
    try:
        from ray._raylet import GcsClient  # Ray's own GCS client (not public API: without it, ray.init says it)
    except ImportError:
        return None
    outcome = {}

    def probe():
        try:
            GcsClient(address=address)
        except Exception as error:  # noqa: BLE001 (which one is decided below)
            outcome["error"] = error

    thread = threading.Thread(target=probe, daemon=True)  # an unreachable address blocks it for ~40 s
    thread.start()
    thread.join(2.0)
    return authentication_refused(address, outcome["error"]) if "error" in outcome else None


def authentication_refused(address: str, error: BaseException) -> str | None:
    """The one line for a cluster that refused this job's authentication (never the token itself), or
    None if ``error`` is something else."""
    import ray.exceptions

    text = f"{error} {error.__cause__ or ''}"
    if not (isinstance(error, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in text):
        return None
    source = token_source()
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return (f"the Ray cluster at {address} requires token authentication and this job sent no token: set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")
    if source is None:
        return (f"the Ray cluster at {address} requires an authentication token and none was found: set RAY_AUTH_TOKEN "
                "or RAY_AUTH_TOKEN_PATH to the cluster's token")
    return f"the Ray cluster at {address} refused the authentication token from {source}: it is not the cluster's token"


def token_source() -> str | None:
    """Where Ray reads this job's token from: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in
    that order (None: nowhere)."""
    return ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
            f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})" if os.environ.get("RAY_AUTH_TOKEN_PATH") else
            "~/.ray/auth_token" if os.path.exists(os.path.expanduser("~/.ray/auth_token")) else None)


def shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
