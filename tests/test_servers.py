"""pipeline.stack.servers: the real SeaweedFS and MLflow servers (tests and the local stack)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import boto3
import pytest

from pipeline.stack.procs import free_port
from pipeline.stack.servers import MLflowServer, SeaweedFS
from pipeline.storage import boto3_client


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_seaweedfs_fixture(s3_server: SeaweedFS) -> None:
    assert s3_server.running
    assert s3_server.endpoint == f"http://127.0.0.1:{s3_server.ports['s3']}"
    env = s3_server.env()
    assert set(env) == {
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    }
    # Every server weed mini starts got its own port.
    assert len(set(s3_server.ports.values())) == len(s3_server.ports)
    identities = json.loads(s3_server.identities_path.read_text())
    assert identities["identities"][0]["credentials"][0]["accessKey"] == s3_server.access_key
    assert s3_server.identities_path.stat().st_mode & 0o077 == 0  # keys: owner only
    assert s3_server.secret_key not in repr(s3_server)
    assert s3_server.log_path is not None and s3_server.log_path.exists()


def test_seaweedfs_start_stop(s3_server: SeaweedFS, tmp_path: Path) -> None:
    """A second instance beside the session one: own ports, keys enforced, stops cleanly."""
    with SeaweedFS(tmp_path / "weed") as server:
        pid = server.pid
        assert server.start_seconds is not None and server.start_seconds < 30
        assert server.endpoint != s3_server.endpoint
        assert set(server.ports.values()).isdisjoint(s3_server.ports.values())
        own = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
        )
        own.create_bucket(Bucket="second")
        assert [b["Name"] for b in own.list_buckets()["Buckets"]] == ["second"]
    assert not server.running and server.pid is None
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # A restart in the same directory keeps the keys and the data.
    again = SeaweedFS(tmp_path / "weed")
    assert again.access_key == server.access_key and again.secret_key == server.secret_key


def test_mlflow_server_with_seaweedfs_artifacts(mlflow_server: MLflowServer, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    assert mlflow_server.uri.startswith("http://127.0.0.1:")
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment_id = client.create_experiment("servers-test")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.0002")
    client.log_metric(run_id, "loss", 0.25, step=3)
    artifact = tmp_path / "note.txt"
    artifact.write_text("flow matching\n")
    client.log_artifact(run_id, str(artifact), artifact_path="notes")
    client.set_terminated(run_id)

    fetched = client.get_run(run_id)
    assert fetched.data.params == {"lr": "0.0002"}
    assert fetched.data.metrics == {"loss": 0.25}
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    local = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "down"))
    assert Path(local).read_text() == "flow matching\n"

    # The artifact really lives in the SeaweedFS bucket behind the server.
    listing = boto3_client().list_objects_v2(Bucket="mlflow-artifacts", Prefix="artifacts/")
    keys = [obj["Key"] for obj in listing.get("Contents", [])]
    assert any(key.endswith(f"{run_id}/artifacts/notes/note.txt") for key in keys), keys
