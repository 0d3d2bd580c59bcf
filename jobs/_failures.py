"""How a job ends when it fails: one line on stderr, an exit code a scheduler can act on, and
the whole story (tracebacks, Ray's errors) in a log file whose path the line names.

Exit codes (``fmpipe <job>``; docs/operations.md "When things fail" lists every case):

- 0: done (also "nothing to do").
- 1: failed, and the input is not known to be at fault (storage unreachable, disk full, a
  worker that kept dying, an unexpected error): running the same command again may succeed,
  and resumes where it stopped.
- 2: bad input (config keys and values, flags, a missing or invalid dataset, a model or
  checkpoint that does not exist or does not fit): the same command fails the same way until
  the input is fixed, so a scheduler should not retry it.
- 130: interrupted (SIGINT, Ctrl-C): what was complete is kept; the same command resumes.

Which errors are bad input is decided by class, through the exception's whole chain of Ray
wrappers (a worker's error reaches the driver inside ``TrainingFailedError`` or
``RayTaskError``): an exception class with an integer ``exit_code`` attribute says so itself;
otherwise :data:`BAD_INPUT_ERRORS` names fmpipe's own input errors by qualified class name,
so that this module imports nothing heavy (Ray's ``RayTaskError`` subclasses the cause's
class, so it matches too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.home import fmpipe_home
from pipeline.redact import scrub

__all__ = [
    "BAD_INPUT_ERRORS",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "Ending",
    "JobLog",
    "describe_failure",
    "exit_code_of",
    "root_cause",
]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

# fmpipe's errors that mean "the input is wrong; retrying cannot help" (module.qualname).
BAD_INPUT_ERRORS = frozenset(
    {
        "pipeline.config.ConfigError",
        "pipeline.data.stream.DatasetError",
        "pipeline.registry.ModelNotFound",
        "pipeline.checkpoint.CheckpointError",
        "pipeline.sample.plan.SampleJobError",
        "pipeline.storage.StorageInputError",  # its exit_code says so too; this, for remote text
        "pipeline.eval.features.FeatureNetworkError",
        "pipeline.eval.reference.PublishedStatsError",
        "pipeline.data.pairs.PairSetError",
    }
)

_MAX_LINE = 1500  # characters of a failure line: a message, not a traceback
_UNWRAP_LIMIT = 10  # wrapper levels followed (a cycle or a very deep chain stops here)


# --------------------------------------------------------------------------- classification
def _class_names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}


def _inner(exc: BaseException) -> BaseException | None:
    """The exception ``exc`` wraps, if it is one of Ray's wrappers (else None).

    - ``ray.train.WorkerGroupError``: ``worker_failures`` {rank: exception}, the lowest rank;
    - ``ray.train.ControllerError``: ``controller_failure``;
    - ``ray.exceptions.RayTaskError`` (and its per-cause subclasses): ``cause``;
    - ``UserCodeException`` (Ray Data's wrapper of an error in a map function): its
      ``__cause__``.
    """
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        return first if isinstance(first, BaseException) else None
    controller = getattr(exc, "controller_failure", None)
    if isinstance(controller, BaseException):
        return controller
    names = _class_names(exc)
    if "ray.exceptions.RayTaskError" in names:
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, BaseException) and cause is not exc else None
    if any(name.endswith("UserCodeException") for name in names):
        return exc.__cause__
    return None


def root_cause(exc: BaseException) -> BaseException:
    """``exc`` with Ray's wrappers taken off (see :func:`_inner`): the error that happened."""
    for _ in range(_UNWRAP_LIMIT):
        inner = _inner(exc)
        if inner is None or inner is exc:
            break
        exc = inner
    return exc


# In a worker's traceback text: "pkg.mod.Error: message" just before Python's "direct cause"
# line. Ray Data re-raises a map function's error as UserCodeException(...) from it, and only
# the text of that chain reaches the driver (the __cause__ object does not travel).
_CHAINED = re.compile(
    r"^([A-Za-z_][\w.]*): (.*)\n\nThe above exception was the direct cause", re.MULTILINE
)


def remote_cause(exc: BaseException) -> tuple[str, str] | None:
    """``(qualified class name, message)`` of the error a Ray wrapper's traceback text shows
    as the direct cause of what was raised in the worker, or None."""
    for _ in range(_UNWRAP_LIMIT):
        # RayTaskError keeps the text in traceback_str; its per-cause subclasses only in str()
        text = getattr(exc, "traceback_str", None) or str(exc)
        if isinstance(text, str):
            found = _CHAINED.findall(text)
            if found:
                return found[0][0], found[0][1].strip()
        inner = _inner(exc)
        if inner is None or inner is exc:
            return None
        exc = inner
    return None


def _is_bad_input(exc: BaseException) -> bool:
    code = getattr(type(exc), "exit_code", None)
    if isinstance(code, int):
        return code == EXIT_BAD_INPUT
    return bool(_class_names(exc) & BAD_INPUT_ERRORS)


def exit_code_of(exc: BaseException, bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """2 when ``exc`` (or what a Ray wrapper around it carries) is bad input, 130 for an
    interrupt, else 1. ``bad_input``: more classes that mean bad input for this job (e.g.
    ``ValueError`` for ``fmpipe prepare``, whose sources refuse a bad spec with it)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    cause = root_cause(exc)
    if isinstance(cause, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    code = getattr(type(cause), "exit_code", None)
    if isinstance(code, int):
        return code
    if _is_bad_input(cause) or _is_bad_input(exc) or isinstance(cause, bad_input):
        return EXIT_BAD_INPUT
    remote = remote_cause(exc)
    if remote is not None and remote[0] in BAD_INPUT_ERRORS:
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def _one_line(text: str) -> str:
    """Whitespace runs (newlines too) as single spaces, at most ``_MAX_LINE`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_LINE else flat[: _MAX_LINE - 3] + "..."


def _message(exc: BaseException, bad_input: tuple[type[BaseException], ...] = ()) -> str:
    """An exception as a message: its own text (fmpipe's errors, and the job's bad-input
    classes, say what and which input); the class name in front when the text does not say
    what kind of error it is."""
    text = str(exc).strip()
    # Ray's wrappers put a traceback in str(); the root cause is what the user needs.
    text = text.split("\nTraceback (most recent call last)", 1)[0].strip()
    name = type(exc).__name__
    if not text:
        return name
    own = type(exc).__module__.startswith("pipeline.")
    if own or isinstance(exc, bad_input) or _is_bad_input(exc):
        return text
    return f"{name}: {text}"


def _where(exc: BaseException, cause: BaseException) -> str:
    """Where a wrapped error happened, for the line ('' when it happened in the driver)."""
    if cause is exc:
        return ""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return f"in training worker {min(failures)}: "
    if "ray.exceptions.RayTaskError" in _class_names(exc):
        return "in a Ray worker: "
    return ""


@dataclass(frozen=True)
class Ending:
    """How a failed job ends: its exit code and its one line for stderr."""

    code: int
    line: str


def describe_failure(
    job: str,
    exc: BaseException,
    *,
    retry_hint: str = "",
    interrupt_hint: str = "",
    log_path: Path | None = None,
    bad_input: tuple[type[BaseException], ...] = (),
) -> Ending:
    """The exit code and the line ``fmpipe <job>: ...`` for ``exc``, scrubbed.

    ``retry_hint`` ends the line of a failure that running again may cure (exit 1);
    ``interrupt_hint`` follows "interrupted;" (exit 130). A bad-input error's own message says
    what to fix. ``log_path``: where the traceback went, named at the end of the line.
    ``bad_input``: see :func:`exit_code_of`.
    """
    code = exit_code_of(exc, bad_input)
    if code == EXIT_INTERRUPTED:
        line = f"fmpipe {job}: interrupted; {interrupt_hint or 're-run the same command to resume'}"
        return Ending(code, scrub(line))
    cause = root_cause(exc)
    message = _message(cause, bad_input)
    remote = remote_cause(exc) if cause is not exc else None
    if remote is not None and any(n.endswith("UserCodeException") for n in _class_names(cause)):
        name, text = remote
        message = text if name.startswith("pipeline.") else f"{name.rsplit('.', 1)[-1]}: {text}"
    line = _one_line(f"fmpipe {job}: error: {_where(exc, cause)}{message}")
    if code != EXIT_BAD_INPUT and retry_hint:
        line = line.rstrip(". ") + f"; {retry_hint}"
    if log_path is not None:
        line += f" (details: {log_path})"
    return Ending(code, scrub(line))


# --------------------------------------------------------------------------- the log file
def _writable_dir(preferred: Path) -> Path:
    """``preferred`` (created), else a temporary directory: a log file never fails a job."""
    for candidate in (preferred, Path(tempfile.gettempdir()) / "fmpipe-logs"):
        with contextlib.suppress(OSError):
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
    return Path(tempfile.gettempdir())


class _LazyFileHandler(logging.FileHandler):
    """A FileHandler that creates its directory (or moves to a temporary one) only when the
    first record comes: a job that logs nothing leaves no directory behind."""

    def _open(self):  # type: ignore[no-untyped-def]
        path = Path(self.baseFilename)
        directory = _writable_dir(path.parent)
        self.baseFilename = str(directory / path.name)
        return super()._open()


class _ScrubFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JobLog:
    """A job's log file, ``$FMPIPE_HOME/logs/<job>-<UTC time>-<pid>.log``, made on first use.

    While installed (:meth:`installed`), records of the root logger and of Ray's loggers
    (which do not propagate to the root) at INFO and above go to it, scrubbed; a failure's
    traceback is added by :meth:`write_failure`. A job that logs nothing and succeeds leaves
    no file behind.
    """

    RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")

    def __init__(self, job: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"{job or 'job'}-{stamp}-{os.getpid()}.log"
        self.handler = _LazyFileHandler(fmpipe_home() / "logs" / name, delay=True, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(
            _ScrubFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )

    @property
    def path(self) -> Path:
        """Where the log is (or will be) written."""
        return Path(self.handler.baseFilename)

    @contextlib.contextmanager
    def installed(self) -> Iterator[JobLog]:
        root = logging.getLogger()
        root.addHandler(self.handler)
        try:
            yield self
        finally:
            root.removeHandler(self.handler)
            for name in self.RAY_LOGGERS:
                logging.getLogger(name).removeHandler(self.handler)
            self.handler.close()

    def capture_ray_loggers(self) -> None:
        """Also take the records of Ray's loggers that stop before the root (call once Ray's
        logging is configured: importing ``ray`` sets it up)."""
        for name in self.RAY_LOGGERS:
            logger = logging.getLogger(name)
            if not logger.propagate and self.handler not in logger.handlers:
                logger.addHandler(self.handler)

    def write_failure(self, job: str, exc: BaseException) -> Path | None:
        """Append ``exc``'s whole traceback (Ray's wrappers and the root cause), scrubbed;
        the path, or None when the file cannot be written."""
        if "ray" in sys.modules:
            self.capture_ray_loggers()
        text = "".join(traceback.format_exception(exc))
        cause = root_cause(exc)
        if cause is not exc:
            text += "\nroot cause:\n" + "".join(traceback.format_exception(cause))
        try:
            self.handler.acquire()
            try:
                if self.handler.stream is None:  # nothing logged yet: make the file now
                    self.handler.stream = self.handler._open()
                self.handler.flush()
            finally:
                self.handler.release()
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(f"fmpipe {job} failed: {type(exc).__name__}\n{scrub(text)}\n")
        except OSError:
            return None
        return self.path


def run_ending(
    job: str,
    action: Callable[[], int],
    log: JobLog,
    retry_hint: Callable[[], str],
    interrupt_hint: Callable[[], str],
    bad_input: Callable[[], tuple[type[BaseException], ...]] = tuple,
) -> int:
    """Run ``action``; a failure becomes :func:`describe_failure`'s line on stderr and its
    exit code, with the traceback in ``log``. ``SystemExit`` passes through."""
    try:
        return action()
    except (Exception, KeyboardInterrupt) as exc:
        extra = bad_input()
        code = exit_code_of(exc, extra)
        path = None if code == EXIT_INTERRUPTED else log.write_failure(job, exc)
        ending = describe_failure(
            job,
            exc,
            retry_hint=_safe(retry_hint),
            interrupt_hint=_safe(interrupt_hint) if code == EXIT_INTERRUPTED else "",
            log_path=path,
            bad_input=extra,
        )
        print(ending.line, file=sys.stderr, flush=True)
        return ending.code


def _safe(hint: Callable[[], str]) -> str:
    """A hint is computed at the end (it may look at storage): never a second failure."""
    try:
        return hint()
    except Exception:
        return ""
