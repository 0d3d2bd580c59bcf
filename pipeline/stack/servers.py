"""Launchers for the real servers of the local stack: SeaweedFS (S3) and an MLflow server.

Used by the tests (fixtures in tests/conftest.py) and by ``fmpipe stack up|down``. Every
server listens on a loopback address with explicit free ports and writes its output to a log
file; a start that fails raises :class:`ServerError` with the tail of that log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.stack.procs import (
    ServerError,
    find_executable,
    free_port,
    free_ports,
    http_status,
    log_tail,
    port_is_free,
    stop_group,
)

__all__ = ["MLflowServer", "SeaweedFS", "ServerError"]


class _Process:
    """A server subprocess in its own process group, with its output in a log file."""

    name = "server"

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.log_path: Path | None = None
        self.start_seconds: float | None = None  # wall time of the last successful start

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self, cmd: list[str], log_path: Path, env: dict[str, str] | None, cwd: Path) -> None:
        self.log_path = log_path
        self._log_file = log_path.open("ab")
        self._log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd),
            start_new_session=True,  # own process group: stop() reaches its children too
        )

    def _fail(self, message: str) -> ServerError:
        tail = log_tail(self.log_path) if self.log_path else "(no log)"
        self.stop()
        return ServerError(f"{message}\n--- last lines of {self.log_path} ---\n{tail}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, wait up to ``timeout`` s, then SIGKILL (see
        :func:`pipeline.stack.procs.stop_group`)."""
        if self._proc is None:
            return
        stop_group(self._proc, timeout)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def start(self, timeout: float = 30.0) -> _Process:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SeaweedFS(_Process):
    """``weed mini``: SeaweedFS master, volume, filer, S3 and WebDAV servers in one process,
    every one on an explicit free loopback port, with S3 credentials enforced from an
    identities file in ``data_dir``."""

    name = "SeaweedFS"
    IDENTITIES = "identities.json"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        s3_port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.s3_port = s3_port
        self.region = region
        if access_key is None and secret_key is None:
            access_key, secret_key = self._stored_keys() or (None, None)
        self.access_key = access_key or "fmpipe" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}

    def __repr__(self) -> str:  # never the keys
        return f"SeaweedFS(data_dir={str(self.data_dir)!r}, endpoint={self._endpoint_or_none()!r})"

    @property
    def identities_path(self) -> Path:
        return self.data_dir / self.IDENTITIES

    def _stored_keys(self) -> tuple[str, str] | None:
        """Keys of an identities file left by an earlier start (a restarted stack keeps them)."""
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError, TypeError):
            data = json.loads(self.identities_path.read_text())
            cred = data["identities"][0]["credentials"][0]
            return str(cred["accessKey"]), str(cred["secretKey"])
        return None

    def _endpoint_or_none(self) -> str | None:
        port = self.ports.get("s3") or self.s3_port
        return f"http://{self.host}:{port}" if port else None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT``."""
        endpoint = self._endpoint_or_none()
        if endpoint is None:
            raise ServerError("SeaweedFS has no S3 port yet: call start() first")
        return endpoint

    def env(self) -> dict[str, str]:
        """Environment for S3 clients of this server (boto3, pyarrow via pipeline.storage)."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def _write_identities(self) -> None:
        config = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        fd = os.open(self.identities_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(config, out, indent=2)

    def _pick_ports(self) -> dict[str, int]:
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"]
        names += ["s3_grpc", "webdav"]
        if self.s3_port is None:
            names.append("s3")
        ports = dict(zip(names, free_ports(len(names), self.host), strict=True))
        if self.s3_port is not None:
            ports["s3"] = self.s3_port
        # weed's maintenance worker dials the admin server at admin.port + 10000 whatever
        # -admin.port.grpc says, so the admin port must leave room for that and both be free.
        taken = set(ports.values())
        for _ in range(200):
            port = free_port(self.host)
            grpc = port + 10000
            if grpc <= 65535 and not {port, grpc} & taken and port_is_free(grpc, self.host):
                ports["admin"], ports["admin_grpc"] = port, grpc
                break
        else:
            raise ServerError("no free port pair (p, p+10000) for the SeaweedFS admin server")
        return ports

    def _command(self, ports: dict[str, int]) -> list[str]:
        data = self.data_dir / "data"
        cmd = [
            find_executable("weed"),
            f"-logdir={self.data_dir / 'logs'}",  # glog files (default: $TMPDIR)
            "mini",
            f"-dir={data}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            "-admin.ui=false",
            f"-s3.config={self.identities_path}",
            "-s3.autoCreateBucket=false",  # like real S3: a missing bucket is an error
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-webdav.port={ports['webdav']}",
            f"-webdav.cacheDir={self.data_dir / 'webdav-cache'}",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={ports['admin_grpc']}",
            f"-admin.dataDir={self.data_dir / 'admin'}",
            "-s3.port.iceberg=0",  # Iceberg catalog and Lance namespace servers: off
            "-s3.port.lance=0",
        ]
        # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in data_dir when the
        # path fits a socket address (108 bytes).
        for kind in ("filer", "s3"):
            sock = self.data_dir / f"{kind}.sock"
            if len(str(sock)) < 100:
                cmd.append(f"-{kind}.localSocket={sock}")
        return cmd

    def start(self, timeout: float = 30.0) -> SeaweedFS:
        """Start ``weed mini`` and wait until S3 answers with these credentials."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        (self.data_dir / "webdav-cache").mkdir(exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        self._write_identities()
        began = time.monotonic()
        attempts = 1 if self.s3_port is not None else 3  # a lost port race: new ports
        for attempt in range(attempts):
            self.ports = self._pick_ports()
            self._spawn(self._command(self.ports), self.data_dir / "weed.log", None, self.data_dir)
            try:
                self._wait_ready(began + timeout)
            except ServerError:
                if attempt + 1 < attempts and time.monotonic() < began + timeout:
                    continue
                raise
            self.start_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")

    def _wait_ready(self, deadline: float) -> None:
        url = self.endpoint + "/"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._fail(f"weed mini exited with code {self._proc.returncode}")
            if http_status(url, timeout=1.0) is not None and self._s3_answers():
                return
            if time.monotonic() > deadline:
                raise self._fail(f"SeaweedFS S3 at {self.endpoint} did not answer in time")
            time.sleep(0.1)

    def _s3_answers(self) -> bool:
        """A signed ListBuckets succeeds: identities loaded and the filer behind S3 is up."""
        import boto3
        from botocore.config import Config as BotoConfig

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=BotoConfig(
                connect_timeout=1,
                read_timeout=2,
                retries={"total_max_attempts": 1},
                s3={"addressing_style": "path"},
            ),
        )
        try:
            client.list_buckets()
        except Exception:
            return False
        return True


class MLflowServer(_Process):
    """``mlflow server`` with a sqlite backend and proxied artifacts (``--serve-artifacts``)
    stored at ``artifacts_destination`` (``s3://bucket/prefix`` or a local path)."""

    name = "MLflow"

    def __init__(
        self,
        backend_db: str | os.PathLike[str],
        artifacts_destination: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.backend_db = Path(backend_db).absolute()
        dest = str(artifacts_destination)
        if "://" not in dest:
            dest = str(Path(dest).absolute())
        self.artifacts_destination = dest
        self.host = host
        self.port = port
        self.extra_env = dict(env or {})
        self._log_override = Path(log_path).absolute() if log_path else None

    def __repr__(self) -> str:
        return (
            f"MLflowServer(uri={self._uri_or_none()!r}, artifacts={self.artifacts_destination!r})"
        )

    def _uri_or_none(self) -> str | None:
        return f"http://{self.host}:{self.port}" if self.port else None

    @property
    def uri(self) -> str:
        """The tracking URI, ``http://127.0.0.1:PORT``."""
        uri = self._uri_or_none()
        if uri is None:
            raise ServerError("MLflow server has no port yet: call start() first")
        return uri

    def server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        # fmpipe submits no MLflow jobs: skip the job runner and its huey worker processes
        # (they outlive a SIGTERM to `mlflow server` otherwise).
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        if self.artifacts_destination.startswith("s3://") and not env.get("MLFLOW_S3_ENDPOINT_URL"):
            endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
            if endpoint:
                env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def command(self) -> list[str]:
        return [
            find_executable("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.backend_db}",
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self, timeout: float = 60.0) -> MLflowServer:
        """Start the server and wait until ``/health`` answers 200."""
        if self.running:
            return self
        self.backend_db.parent.mkdir(parents=True, exist_ok=True)
        if "://" not in self.artifacts_destination:
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        log_path = self._log_override or self.backend_db.parent / "mlflow-server.log"
        began = time.monotonic()
        self._spawn(self.command(), log_path, self.server_env(), self.backend_db.parent)
        health = self.uri + "/health"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._fail(f"mlflow server exited with code {self._proc.returncode}")
            if http_status(health, timeout=1.0) == 200:
                break
            if time.monotonic() - began > timeout:
                raise self._fail(f"MLflow server at {self.uri} did not answer /health in time")
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - began
        return self
