"""Ray and process workarounds, all in one place: start-up, console, environment, memory.

Each entry says what breaks without it; ``tests/test_rayenv.py`` (and ``tests/test_malloc.py``
for the memory one) holds a test that fails without it. Add a new workaround here, not in
the module that needs it, and remove one when the test shows it no longer earns its place.

- :func:`ensure_ray`: a local Ray with ``log_to_driver=False``, so Ray's own chatter stays
  in its log files under the session directory; without it every worker's log lines reach
  the job's console. Its metrics ports on 127.0.0.1 (without
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` they answer on 0.0.0.0 without the token), and
  Ray's error records off the console (a job reports the error as one line) and in the
  job's log file.
  A start whose raylet misses Ray's fixed 30 s registration window (an overloaded
  machine) is retried, twice at most, after its processes are killed and a pause that lets
  the load settle; without it the job fails with
  "The current node timed out during startup".
- :func:`train_environ`: Ray Train starts a preemption watcher (one more actor process per
  run, a link in the chain of process starts before the first step) even on the one-machine
  Ray that :func:`ensure_ray` started, where no node is ever drained; it is off there.
- :func:`ctrl_c_raises`: a process started with SIGINT ignored or blocked (a non-interactive
  shell's ``job &``, some supervisors, a parent that blocked it) keeps it so across exec, and
  Python then installs no handler: Ctrl-C and ``kill -INT`` are lost and a job runs to its
  end. Every job makes SIGINT raise ``KeyboardInterrupt`` at its start.
- :func:`interrupts_as_keyboard_interrupt`: Ray Train's own SIGINT handler turns Ctrl-C into
  ``sys.exit(0)`` inside ``fit()`` (exit 1, nothing said); inside the block Ctrl-C stops the
  run and raises ``KeyboardInterrupt``, which the jobs report as "interrupted" (exit 130).
- :func:`quiet_ray_console` / :func:`quiet_library_loggers`: Ray, Ray Data, MLflow, boto
  and alembic log INFO lines (execution plans, token notices, DB migrations, uploads) to the
  console; jobs show fmpipe's own progress lines and summary instead.
- :func:`quiet_cpp_notices`: Ray's C++ core writes ray#53727's actor-restart notice straight
  to fd 2, past Python's logging; only a filter on fd 2 keeps it off the console.
- :func:`scoped_environ`: Ray workers read the S3 endpoint and credentials from their own
  environment (a pickled Location carries no keys), so they must be in ``os.environ`` when
  Ray starts; and ``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS`` override the address given to
  ``JobSubmissionClient``, so the submitter hides them while it builds the client.
- :func:`keep_freed_memory`: glibc returns freed activation memory to the kernel between
  steps, so the next step pays a minor fault and zero-fill per 4 KiB page.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping

__all__ = [
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "ctrl_c_raises",
    "ensure_ray",
    "interrupts_as_keyboard_interrupt",
    "keep_freed_memory",
    "on_local_ray",
    "quiet_cpp_notices",
    "quiet_library_loggers",
    "quiet_ray_console",
    "scoped_environ",
    "train_environ",
]

log = logging.getLogger(__name__)

# Console notices that say nothing actionable to a job's user (they stay in Ray's log files).
_MUTED_PREFIXES = (
    "Token authentication is enabled",  # auth stays on (docs/design.md); the notice is noise
    "Progress bars disabled",
    "Started a local Ray instance",
)


# Lines Ray's C++ core writes straight to the driver's stderr (file descriptor 2, past
# Python's logging) that say nothing actionable; the same line is in Ray's
# python-core-driver-*.log. ray#53727: every Ray Data actor pool with restarts on gets its
# constructor arguments from the object store (Ray Data's own refs, held for the pool's life).
_CPP_NOTICES = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
    rb"object store and max_restarts > 0"
)


class _MuteRayNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_MUTED_PREFIXES)


def _console_handlers(name: str) -> list[logging.Handler]:
    return [
        handler
        for handler in logging.getLogger(name).handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
    ]


def quiet_ray_console() -> None:
    """Raise Ray's console handlers to WARNING (file handlers keep everything); no Ray Data
    progress bars: the jobs print their own progress lines, which read the same in a log."""
    import ray.data

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for handler in _console_handlers(name):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_MuteRayNotices())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


class _NoErrorsOnConsole(logging.Filter):
    """Keeps Ray's ERROR records (and any with a traceback) off the console: the error itself
    reaches the caller as an exception, which a job turns into one line; the record stays in
    Ray's log files and in the job's log file (see :func:`ensure_ray`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not record.exc_info


def _ray_logs_to_root_files() -> None:
    """Ray's loggers stop at their own handlers (they do not propagate to the root): give
    them the root logger's file handlers too (a job's log file), and keep their errors off
    the console."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for handler in _console_handlers(name):
            if not any(isinstance(f, _NoErrorsOnConsole) for f in handler.filters):
                handler.addFilter(_NoErrorsOnConsole())
        if not logger.propagate:
            for handler in files:
                if handler not in logger.handlers:
                    logger.addHandler(handler)


# Messages the GCS pushes to the driver ("(raylet) A worker died ...", "(raylet) Task X
# failed. There are 1 retries remaining ..."): Ray prints them on the driver's stdout
# whatever ``log_to_driver`` says (ray._private.worker.listen_error_messages calls the module's
# print_to_stdstream). Ray Data retries such a task itself, and a failure that stops a job
# reaches it as an exception (one line, jobs._failures); on the console they are a
# paragraph of worker ids in the middle of a job's progress (seen on Ctrl-C of `fmpipe
# sample`). They go to the job's log file instead, beside Ray's own record in raylet.out:
# logged at INFO under Ray's logger, whose console handler shows WARNING and up
# (quiet_ray_console) and whose file handlers (the job's log) take INFO.
_ray_messages = logging.getLogger("ray.fmpipe_driver_messages")


def _driver_messages_to_files() -> None:
    """Route the driver's pushed Ray messages (pid ``raylet``) to :data:`_ray_messages`."""
    import ray._private.worker as ray_worker

    _ray_messages.setLevel(logging.INFO)  # "ray" itself is at WARNING (quiet_library_loggers)

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "fmpipe_routed", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            printer(data, ignore_prefix)
            return
        for line in data.get("lines") or ():
            _ray_messages.info("(raylet) %s", line)

    print_to_stdstream.fmpipe_routed = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def _loopback_environ() -> dict[str, str]:
    """What a local Ray needs to keep its unauthenticated ports on loopback (Ray 2.60).

    ``ray.init`` takes the machine's address as the node's unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says the cluster is this machine alone; with the
    machine's address the metrics export port (reporter agent) and the autoscaler's
    Prometheus server bind 0.0.0.0 and answer without the token. With it, they bind
    127.0.0.1 (``reporter_agent`` and ``monitor.py`` bind ``get_localhost_ip()`` for a
    loopback node). The autoscaler's and dashboard's metrics ports default to fixed 44217 /
    44227, which a second local Ray on the machine cannot have: free ones are picked.
    Ray's children read these variables when they start; the driver read the first at
    ``import ray``, so :func:`ensure_ray` also sets Ray's constant itself.
    """
    import socket

    def free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])

    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "AUTOSCALER_METRIC_PORT": os.environ.get("AUTOSCALER_METRIC_PORT") or str(free_port()),
        "DASHBOARD_METRIC_PORT": os.environ.get("DASHBOARD_METRIC_PORT") or str(free_port()),
    }


def _will_start_local_ray() -> bool:
    """Whether ``ray.init()`` would start a new local Ray (no RAY_ADDRESS, no cluster that
    ``ray start`` left on this machine) rather than connect to one."""
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address(None) is None
    except Exception:  # an address that cannot be resolved: ray.init will say so itself
        return False


# Ray gives a new local node's raylet a fixed 30 s to register with its GCS
# (ray/_private/node.py, not configurable); on an overloaded machine (2 cores, other jobs
# starting their own Rays) it can miss that, even twice in a row (seen in the test suite),
# and succeed at a later try once the load has passed.
_STARTUP_TIMEOUT = "timed out during startup"
_START_ATTEMPTS = 3
_START_PAUSE_S = 5.0  # before attempt k+1: k times this


def _child_pids() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def _kill_unstarted_node(before: set[int]) -> None:
    """Kill the processes a failed local start left (its GCS, raylet, ...): this process's
    children that were not there before the start (servers a caller runs are spared)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        if child.pid not in before:
            with contextlib.suppress(psutil.Error):
                child.kill()


# The GCS address of the local Ray that ensure_ray started (None: it started none).
_local_gcs: str | None = None


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Start a quiet local Ray unless one is running (or ``ray job submit`` connected us).

    A Ray this starts listens on 127.0.0.1 only where it has no token to check (the metrics
    ports; see :func:`_loopback_environ`), runs with token authentication (Ray's default for
    a new cluster) and no dashboard. Ray's error records stay off the console and go to the
    root logger's file handlers (a job's log file) as well as to Ray's own logs.

    Returns True when this call started Ray (so the caller should shut it down).
    """
    global _local_gcs
    import ray

    started = False
    for handler in _console_handlers("ray"):
        handler.addFilter(_MuteRayNotices())
    if not ray.is_initialized():
        if _will_start_local_ray():
            from ray._private import ray_constants

            # Read by ray._private.services at call time (the children read the variable);
            # once the node is up, the driver asks it for its address instead.
            saved = ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = False
            try:
                for attempt in range(1, _START_ATTEMPTS + 1):
                    before = _child_pids()
                    try:
                        with scoped_environ(_loopback_environ()):
                            ray.init(
                                num_cpus=num_cpus,
                                log_to_driver=False,
                                logging_level=logging.WARNING,
                                include_dashboard=False,
                                _node_ip_address="127.0.0.1",
                            )
                        _local_gcs = ray.get_runtime_context().gcs_address
                        break
                    except Exception as exc:
                        if attempt == _START_ATTEMPTS or _STARTUP_TIMEOUT not in str(exc):
                            raise
                        log.warning("local Ray did not start (%s); retrying", exc)
                        _kill_unstarted_node(before)
                        time.sleep(_START_PAUSE_S * attempt)
            finally:
                ray_constants.ENABLE_RAY_CLUSTER = saved
        else:
            ray.init(
                num_cpus=num_cpus,
                log_to_driver=False,
                logging_level=logging.WARNING,
                include_dashboard=False,
            )
        started = True
    quiet_ray_console()
    _ray_logs_to_root_files()
    _driver_messages_to_files()
    return started


_PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def on_local_ray() -> bool:
    """Whether this process is connected to the local Ray that :func:`ensure_ray` started."""
    import ray

    return (
        _local_gcs is not None
        and ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _local_gcs
    )


def train_environ() -> dict[str, str]:
    """Variables to set around ``TorchTrainer.fit()`` (Ray Train reads them from the
    driver's environment then, and hands them to its controller and workers).

    On the local Ray :func:`ensure_ray` started (one machine, no autoscaler: nothing drains
    a node), Ray Train's preemption watcher is off: it is one more actor process per run
    (~2-3 s of CPU on 2 cores, started before the first step) with nothing to watch. On a
    cluster, or where the user set ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER``, nothing changes.
    """
    if _PREEMPTION_WATCHER in os.environ or not on_local_ray():
        return {}
    return {_PREEMPTION_WATCHER: "0"}


class _StderrFilter:
    """File descriptor 2 through a pipe, and a thread that passes on what ``pattern`` spares.

    A partial line is passed on at once unless it opens with ``[`` (as Ray's C++ log lines
    do), so progress bars (which end in ``\\r``) still move while the filter is in.
    """

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.saved = -1
        self.thread: threading.Thread | None = None

    def start(self) -> bool:
        """Put the filter in; False (and nothing changed) when there is no usable fd 2."""
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
        except (OSError, ValueError):  # embedded interpreters, closed stderr
            return False
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.thread = threading.Thread(
            target=self._forward, args=(read_end,), name="fmpipe-stderr-filter", daemon=True
        )
        self.thread.start()
        return True

    def stop(self) -> None:
        """Restore fd 2 and let the thread pass on what is left in the pipe."""
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(self.saved, 2)  # closes the pipe's last write end: the thread reads to its end
        assert self.thread is not None
        self.thread.join(timeout=5)
        if not self.thread.is_alive():  # else a child holds the pipe: the thread writes on
            os.close(self.saved)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a closed console: keep draining the pipe
            view = memoryview(data)
            while view:
                view = view[os.write(self.saved, view) :]

    def _forward(self, read_end: int) -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not self.pattern.search(line))
                if not pending.startswith(b"["):  # not a C++ log line's start: pass it on now
                    kept, pending = kept + pending, b""
                if kept:
                    self._write(kept)
        if pending and not self.pattern.search(pending):
            self._write(pending)


_filter_lock = threading.Lock()
_filter: _StderrFilter | None = None
_filter_users = 0


@contextlib.contextmanager
def quiet_cpp_notices() -> Iterator[None]:
    """Drop Ray's known C++ notices (``_CPP_NOTICES``) from this process's stderr while inside.

    Everything else written to fd 2 (tracebacks, warnings, Ray's Python logs, progress bars)
    reaches the console as it arrives. Safe to nest and to enter from several threads: the
    first entrant puts the filter in, the last one out takes it away.
    """
    global _filter, _filter_users
    with _filter_lock:
        if _filter_users == 0:
            candidate = _StderrFilter(_CPP_NOTICES)
            _filter = candidate if candidate.start() else None
        _filter_users += 1
    try:
        yield
    finally:
        with _filter_lock:
            _filter_users -= 1
            if _filter_users == 0 and _filter is not None:
                _filter.stop()
                _filter = None


# --------------------------------------------------------------------------- library loggers
# Loggers whose INFO lines are theirs, not the job's: S3 clients, Ray, MLflow and its DB.
CHATTY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "ray", "mlflow", "alembic")


def quiet_library_loggers() -> None:
    """Raise the libraries' loggers to WARNING (their detail stays in Ray's log files).

    MLflow re-sets its logger's level when it is imported, so it is also told through its
    own variable (``MLFLOW_LOGGING_LEVEL``), which it reads at import. Ray's packaging of a
    job's working directory says at INFO that ``.git`` is ignored "by default": fmpipe
    excludes it on purpose, so that logger is raised to ERROR.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- environment
@contextlib.contextmanager
def scoped_environ(
    values: Mapping[str, str] | None = None, *, unset: Iterable[str] = ()
) -> Iterator[None]:
    """``os.environ`` with ``values`` set and ``unset`` removed for the block, then exactly
    as it was (also after an error).

    Only for what reaches its consumer no other way: processes started inside the block
    (Ray's workers, at ``ray.init``) inherit the environment, and some libraries read a
    setting only from there. Anything that can be passed as an argument should be.
    """
    values = dict(values or {})
    names = set(values) | set(unset)
    saved = {name: os.environ.get(name) for name in names}
    for name in unset:
        os.environ.pop(name, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------- memory
# mallopt(3) parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for the adaptive threshold
TRIM_THRESHOLD = 1 << 30

_malloc_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Keep freed heap memory in the process, so each step reuses pages already mapped.

    A training or sampling step on the CPU allocates its activations (megabytes each),
    frees them at the end of the step and allocates the same sizes again in the next one.
    With glibc's defaults, allocations above the mmap threshold (128 KiB, adapting up to
    32 MiB) get their own ``mmap`` and are unmapped on free, and free space above the trim
    threshold at the top of a heap goes back to the kernel: the next step touches fresh
    pages, a minor fault and a zero-fill each. Measured on the demo U-Net sampler (one
    thread, blocks of 50): ~3,800 minor faults per sample, 17% of its CPU time in the kernel;
    with this, 3 faults per sample and ~1.2x the samples/s (docs/benchmarks.md).

    Sets glibc's mmap threshold to ``MMAP_THRESHOLD`` and its trim threshold to
    ``TRIM_THRESHOLD`` for the whole process (idempotent). The cost is resident memory: a
    process keeps up to its peak heap, which a long-running worker reuses anyway. Returns
    True where applied, False where the C library is not glibc (macOS, musl).
    """
    global _malloc_applied
    if _malloc_applied is None:
        _malloc_applied = _apply_mallopt()
    return _malloc_applied


def _apply_mallopt() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Order matters: setting the mmap threshold also switches off glibc's adaptive rule.
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    log.debug(
        "malloc: mmap threshold %d, trim threshold %d: %s", MMAP_THRESHOLD, TRIM_THRESHOLD, done
    )
    return done


# --------------------------------------------------------------------------- Ctrl-C
ABORT_TIMEOUT_S = 30.0  # how long Ctrl-C waits for Ray Train to stop its workers


def ctrl_c_raises() -> None:
    """SIGINT raises ``KeyboardInterrupt`` in this process, whatever it inherited.

    Ignored and blocked signals survive ``exec``; Python installs its SIGINT handler only
    where the signal was not ignored, and a blocked one never arrives. So a job started that
    way (``fmpipe sample ... &`` from a script, a supervisor) would ignore Ctrl-C and
    ``kill -INT`` and run to its end, never saying "interrupted". Main thread only (signal
    handlers live there); elsewhere nothing changes.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """Ctrl-C in Ray Train's ``fit()`` stops the run and raises ``KeyboardInterrupt``.

    Ray Train V2 (2.60, ``DataParallelTrainer._register_sigint_handler``) replaces the
    process's SIGINT handler inside ``fit()`` with its own: it aborts the controller and then
    calls ``sys.exit(0)`` from inside the handler, which surfaces in the driver as
    ``SystemExit`` or ``RayActorError`` (exit 1 in about 5 s, nothing printed) instead of the
    ``KeyboardInterrupt`` that the driver and the job turn into "interrupted; re-run the same
    command to resume" and exit 130. Inside this block the handler it registers does Ray's
    graceful part (abort the controller, which stops the workers, waiting up to
    ``ABORT_TIMEOUT_S``) and then raises ``KeyboardInterrupt`` in the driver, where ``fit()``
    was waiting; a second Ctrl-C meanwhile raises it at once. The SIGINT handler from before
    the block is put back afterwards (Ray leaves its own installed after ``fit()``).
    """
    import signal

    try:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    except ImportError:  # no Ray Train V2: nothing replaces the handler
        yield
        return
    original = DataParallelTrainer.__dict__.get("_register_sigint_handler")
    if original is None:  # Ray changed: tests/test_failures.py's SIGINT test says so
        log.warning("Ray Train has no _register_sigint_handler: Ctrl-C is Ray's own")
        yield
        return
    before = signal.getsignal(signal.SIGINT)

    def register(self: object, controller: object) -> None:
        del self

        def handler(signum: int, frame: object) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # 2nd Ctrl-C: at once
            import ray

            with contextlib.suppress(Exception):
                ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)  # type: ignore[attr-defined]
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)

    DataParallelTrainer._register_sigint_handler = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        DataParallelTrainer._register_sigint_handler = original  # type: ignore[method-assign]
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)
