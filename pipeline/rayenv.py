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


def quiet_ray_console(progress_bars: bool = False) -> None:
    """Raise Ray's console handlers to WARNING; file handlers keep everything."""
    import ray.data

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for handler in _console_handlers(name):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_MuteRayNotices())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.print_on_execution_start = False


def ensure_ray(num_cpus: int | None = None, progress_bars: bool = False) -> bool:
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
    quiet_ray_console(progress_bars)
    return started


@contextlib.contextmanager
def quiet_cpp_notices(pattern: re.Pattern[bytes] = _CPP_NOTICES) -> Iterator[None]:
    """Drop known C++ notices (``pattern``) from this process's stderr while inside.

    File descriptor 2 goes through a pipe; a thread passes everything else on to the
    original stderr as it arrives (a partial line at once unless it opens with ``[``, as
    Ray's C++ log lines do), so tracebacks, warnings, Ray's Python logs and progress bars
    still reach the console. On exit fd 2 is restored and the rest is flushed.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): nothing to do
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def write(data: bytes) -> None:
        with contextlib.suppress(OSError):  # a closed console: keep draining the pipe
            view = memoryview(data)
            while view:
                view = view[os.write(saved, view) :]

    def forward() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not pattern.search(line))
                if not pending.startswith(b"["):  # not a C++ log line's start: pass it on
                    kept, pending = kept + pending, b""  # now (progress bars end in \r)
                if kept:
                    write(kept)
        if pending and not pattern.search(pending):
            write(pending)

    thread = threading.Thread(target=forward, name="fmpipe-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to its end
        thread.join(timeout=5)
        if not thread.is_alive():  # else a child holds the pipe: the thread still writes here
            os.close(saved)
