"""Starting Ray the same way from every job: local when no cluster is given, quiet console.

Ray's own chatter (executor plans, progress logging, token notices) belongs in Ray's log
files under the session directory, not on the job's console, which shows fmpipe's progress
and summary.
"""

from __future__ import annotations

import logging


def quiet_ray_console(progress_bars: bool = False) -> None:
    """Raise Ray's console handlers to WARNING; file handlers keep everything."""
    import ray.data

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.print_on_execution_start = False


def ensure_ray(num_cpus: int | None = None, progress_bars: bool = False) -> bool:
    """Start a quiet local Ray unless one is running (or ``ray job submit`` connected us).

    Returns True when this call started Ray (so the caller should shut it down).
    """
    import ray

    started = False
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
