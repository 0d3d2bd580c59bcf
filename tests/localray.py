"""The local Ray of the in-process Ray tests: one per test module (``local_ray``).

Started after the S3 variables are set (the module fixture asks for ``s3_server`` first),
so Ray's workers inherit them. ``TRAIN_POLL_S`` is Ray Train's health-check interval for
every Ray the tests start (in-process, job subprocesses, ``ray start`` clusters): Ray Train
collects ``report()`` results at its health checks (every 2 s by default), so a shorter
interval keeps each checkpoint and each run's end from waiting for one (about 2 s per run;
docs/benchmarks.md, "The test suite").

Imported as ``from localray import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import pytest

TRAIN_POLL_S = "0.1"  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in every Ray the tests start


@contextlib.contextmanager
def local_ray(num_cpus: int = 4, by_value: ModuleType | None = None) -> Iterator[None]:
    """``ray.init`` for the ``with`` block (an earlier one is shut down first), quiet, with
    :data:`TRAIN_POLL_S`. ``by_value``: a test module whose functions and classes workers
    receive by value (``ray.cloudpickle.register_pickle_by_value``: tests/ is not a package
    the workers can import)."""
    import ray
    import ray.cloudpickle

    if by_value is not None:
        ray.cloudpickle.register_pickle_by_value(by_value)
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
        # What rayenv.train_environ sets on the local Ray a job starts (one machine, nothing
        # drains a node): without it each run here starts a PreemptionWatcher actor, ~1.2 s
        # of CPU per Ray Train run on 2 cores (27 runs in the suite).
        patch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield
        finally:
            ray.shutdown()
