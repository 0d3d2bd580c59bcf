"""Starting Ray the same way from every job: local when no cluster is given, quiet console.

Ray's own chatter (executor plans, progress logging, token notices) belongs in Ray's log
files under the session directory, not on the job's console, which shows fmpipe's progress
and summary.
"""

from __future__ import annotations

import logging

# Console notices that say nothing actionable to a job's user (they stay in Ray's log files).
_MUTED_PREFIXES = (
    "Token authentication is enabled",  # auth stays on (DESIGN.md); the notice is noise
    "Progress bars disabled",
    "Started a local Ray instance",
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
