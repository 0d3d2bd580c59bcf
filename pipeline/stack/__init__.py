"""The local stack and its parts, all on 127.0.0.1.

- :mod:`pipeline.stack.local`: :class:`Stack`, what ``fmpipe stack up|down|status|env`` drives
  (SeaweedFS S3, an MLflow server and a Ray head, detached, under ``<home>/stack``).
- :mod:`pipeline.stack.servers`: :class:`SeaweedFS` and :class:`MLflowServer`, child-process
  launchers used by the stack and by the test fixtures.
- :mod:`pipeline.stack.procs`: the one toolkit for ports and processes under them.
"""

from __future__ import annotations

from pipeline.stack.local import BUCKET, ServiceStatus, Stack, StackError
from pipeline.stack.procs import ServerError, find_executable, free_port, port_is_free
from pipeline.stack.servers import MLflowServer, SeaweedFS

__all__ = [
    "BUCKET",
    "MLflowServer",
    "SeaweedFS",
    "ServerError",
    "ServiceStatus",
    "Stack",
    "StackError",
    "find_executable",
    "free_port",
    "port_is_free",
]
