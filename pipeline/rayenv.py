"""Starting Ray the same way from every job: local when no cluster is given, quiet console.

Ray's own chatter (executor plans, progress logging, token notices) belongs in Ray's log
files under the session directory, not on the job's console, which shows fmpipe's progress
and summary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

# Console notices that say nothing actionable to a job's user (they stay in Ray's log files).
_MUTED_PREFIXES = (
    "Token authentication is enabled",  # auth stays on (DESIGN.md); the notice is noise
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


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Start a quiet local Ray unless one is running (or ``ray job submit`` connected us).

    Returns True when this call started Ray (so the caller should shut it down).
    """
    import ray

    started = False
    for handler in _console_handlers("ray"):
        handler.addFilter(_MuteRayNotices())
    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus,
            log_to_driver=False,
            logging_level=logging.WARNING,
            include_dashboard=False,
        )
        started = True
    quiet_ray_console()
    return started


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
