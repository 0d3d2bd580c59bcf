"""A real two-node Ray cluster on this machine, for the job-submission tests.

``ray start --head --block`` (node A, resource ``node_a``) plus ``ray start --address ...
--block`` (node B, resource ``node_b``), each with its own ``--num-cpus`` and explicit free
ports, the dashboard and Jobs API on 127.0.0.1, token authentication on
(``RAY_AUTH_MODE=token``, a test-owned token file in ``RAY_AUTH_TOKEN_PATH``: Ray's ports
listen on all interfaces, the token keeps strangers off).

Each ``ray start --block`` runs in a session of its own and owns its node's processes. Stop
is per cluster, never ``ray stop`` (which stops every Ray node of the user on the machine,
other sessions' clusters included): SIGTERM to each leader (``--block`` then shuts its node
down itself), then SIGKILL to whatever of the process tree recorded before is left, matched
by pid *and* start time so that a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localray import TRAIN_POLL_S

from pipeline.stack.procs import alive, find_executable, free_port, process_tree, start_time

HOST = "127.0.0.1"
# Per-node ports, given explicitly: two nodes on one machine must not share the defaults.
_NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
# Variables that must not leak from the test process into the nodes.
_DROPPED_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
)


# A node's daemon logs worth showing when it does not come up (under session_latest/logs).
_DAEMON_LOGS = ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err")
START_ATTEMPTS = 3


class ClusterError(RuntimeError):
    pass


@dataclass
class RayNode:
    name: str  # node_a | node_b
    proc: subprocess.Popen
    log_path: Path
    ports: dict[str, int]
    started: int | None = None

    def tree(self) -> dict[int, int | None]:
        return process_tree(self.proc.pid)


@dataclass
class LocalRayCluster:
    """Two Ray nodes on 127.0.0.1 with token auth; see the module doc."""

    env: Mapping[str, str]  # the nodes' environment (what every job process inherits)
    head_cpus: int = 2
    worker_cpus: int = 2
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fmr-", dir="/tmp")))
    nodes: list[RayNode] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0

    def __post_init__(self) -> None:
        self._make_root()

    def _make_root(self) -> None:
        # short root: Ray's unix sockets live under <temp-dir>/session_*/sockets (108 chars max)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)

    # ---- addresses and the client environment
    @property
    def address(self) -> str:
        """The Jobs API / dashboard URL (what ``fmpipe submit --address`` takes)."""
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{HOST}:{self.gcs_port}"

    def client_env(self) -> dict[str, str]:
        """What a client needs: token auth on and this cluster's token file."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def node_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.env.items() if k not in _DROPPED_ENV}
        env.update(self.client_env())
        # `python -m jobs.<name>` in a job runs the test's Python (fmpipe, Ray installed)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # no Serve to drain: stop at once
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = TRAIN_POLL_S  # reports collected sooner
        return env

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def get(self, path: str, timeout: float = 5.0) -> tuple[int | None, Any]:
        """GET ``path`` on the dashboard with the token: (status, parsed JSON or text)."""
        request = urllib.request.Request(self.address + path, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read().decode(errors="replace")
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code), ""
        except (urllib.error.URLError, OSError):
            return None, ""
        with contextlib.suppress(ValueError):
            return status, json.loads(body)
        return status, body

    # ---- start / stop
    def _spawn(self, name: str, args: list[str]) -> RayNode:
        ports = {p: free_port(HOST) for p in _NODE_PORTS}
        cmd = [
            find_executable("ray"),
            "start",
            "--block",
            f"--node-ip-address={HOST}",
            # one temp dir per node, as on separate machines: a shared one would let a node's
            # runtime-env agent replace the working_dir another node's job runs in (Ray
            # refreshes a cached working_dir when a new job uses the same package)
            f"--temp-dir={self.root / name}",
            "--disable-usage-stats",
            f"--resources={json.dumps({name: 1})}",
            *args,
            *(f"--{key}={value}" for key, value in ports.items()),
        ]
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.node_env(),
                cwd=str(self.root),
                start_new_session=True,  # its own session and process group
            )
        node = RayNode(name, proc, log_path, ports, start_time(proc.pid))
        self.nodes.append(node)
        return node

    def _fail(self, what: str) -> ClusterError:
        """The error, with the tails of each node's `ray start` output and of its daemons'
        logs (read now: :meth:`stop` removes them)."""
        tails = []
        for node in self.nodes:
            session_logs = self.root / node.name / "session_latest" / "logs"
            for path, count in (
                (node.log_path, 30),
                *((session_logs / name, 10) for name in _DAEMON_LOGS),
            ):
                with contextlib.suppress(OSError):
                    lines = path.read_text(errors="replace").splitlines()[-count:]
                    if lines:
                        tails.append(f"--- {path} ---\n" + "\n".join(lines))
        return ClusterError(what + "\n" + "\n".join(tails))

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise self._fail(f"`ray start` of {node.name} exited ({node.proc.returncode})")
            if time.monotonic() > deadline:
                raise self._fail(f"timed out waiting for {what}")
            time.sleep(0.5)

    def alive_nodes(self) -> list[dict[str, Any]]:
        status, body = self.get("/api/v0/nodes?limit=100&detail=1")
        if status != 200 or not isinstance(body, dict):
            return []
        rows = body.get("data", {}).get("result", {}).get("result", [])
        return [row for row in rows if row.get("state") == "ALIVE"]

    def start(self, timeout: float = 120.0) -> LocalRayCluster:
        """Start both nodes; a start that fails (on 2 cores a raylet can miss Ray's fixed
        30 s registration window, as ``rayenv.ensure_ray`` also meets) is reported on
        stderr and tried again from scratch (new root, token and ports), up to
        :data:`START_ATTEMPTS` times."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return self._start_once(timeout)
            except ClusterError as exc:
                if attempt == START_ATTEMPTS:
                    raise
                print(f"cluster start {attempt} failed, trying again: {exc}", file=sys.stderr)
                self.root = Path(tempfile.mkdtemp(prefix="fmr-", dir="/tmp"))
                self._make_root()
                time.sleep(5.0 * attempt)  # let the load that made it miss pass
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> LocalRayCluster:
        self.gcs_port, self.dashboard_port = free_port(HOST), free_port(HOST)
        self._spawn(
            "node_a",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port(HOST)}",
                f"--num-cpus={self.head_cpus}",
            ],
        )
        try:
            self._wait("the Jobs API", lambda: self.get("/api/jobs/")[0] == 200, timeout)
            self._spawn(
                "node_b", [f"--address={self.gcs_address}", f"--num-cpus={self.worker_cpus}"]
            )
            self._wait("two alive nodes", lambda: len(self.alive_nodes()) == 2, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def node_ids(self) -> dict[str, str]:
        """``{"node_a": <node id>, "node_b": <node id>}`` from the custom resources."""
        out = {}
        for row in self.alive_nodes():
            total = row.get("resources_total") or {}
            for name in ("node_a", "node_b"):
                if name in total:
                    out[name] = row["node_id"]
        return out

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM each leader (its node shuts down), then SIGKILL what is left of its tree."""
        for node in reversed(self.nodes):  # workers first, then the head
            procs = node.tree()
            if alive(node.proc.pid, node.started):
                with contextlib.suppress(ProcessLookupError):
                    node.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=timeout)
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)  # the group is ours (setsid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=10)
            deadline = time.monotonic() + 5
            left = {p: s for p, s in procs.items() if alive(p, s)}
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = {p: s for p, s in left.items() if alive(p, s)}
            for pid, started in left.items():
                if alive(pid, started):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
