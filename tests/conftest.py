"""Shared fixtures: real servers (SeaweedFS for S3, an MLflow server) and the ``gpu`` marker.

- ``s3_server`` (session): a started SeaweedFS with random keys; AWS_ENDPOINT_URL_S3,
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION point at it for the session.
- ``s3_bucket`` (function): a fresh, empty bucket; its URI ``s3://<name>``.
- ``mlflow_server`` (session): ``mlflow server`` on sqlite with artifacts in a SeaweedFS
  bucket; tests use ``mlflow_server.uri``.
- tests marked ``@pytest.mark.gpu`` are skipped where ``torch.cuda.is_available()`` is False.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pipeline.stack.servers import MLflowServer, SeaweedFS

# Variables that would point S3 clients elsewhere or sign with other credentials.
_S3_ENV_CLEARED = ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A running SeaweedFS (S3 on a free loopback port) with the client env set to it."""
    from pipeline.stack.servers import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    patch = pytest.MonkeyPatch()
    try:
        for name in _S3_ENV_CLEARED:
            patch.delenv(name, raising=False)
        for name, value in server.env().items():
            patch.setenv(name, value)
        yield server
    finally:
        patch.undo()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: SeaweedFS) -> Iterator[str]:
    """A fresh bucket with a unique valid name; yields ``s3://<name>``, removed afterwards."""
    from pipeline.storage import boto3_client

    name = f"test-{uuid.uuid4().hex[:24]}"
    client = boto3_client()
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    with contextlib.suppress(Exception):
        _empty_bucket(client, name)
        client.delete_bucket(Bucket=name)


def _empty_bucket(client: object, name: str) -> None:
    paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    for page in paginator.paginate(Bucket=name):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def mlflow_server(
    s3_server: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MLflowServer]:
    """A real ``mlflow server`` (sqlite backend, artifacts in a SeaweedFS bucket)."""
    from pipeline.stack.servers import MLflowServer
    from pipeline.storage import boto3_client

    bucket = "mlflow-artifacts"
    boto3_client().create_bucket(Bucket=bucket)
    home = tmp_path_factory.mktemp("mlflow")
    server = MLflowServer(
        home / "mlflow.db",
        f"s3://{bucket}/artifacts",
        env=s3_server.env(),
    )
    server.start(timeout=180)  # a loaded 2-core machine: a slow start is not a failure
    try:
        yield server
    finally:
        server.stop()
