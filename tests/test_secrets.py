"""A secret never leaks: not to the console, not into $FMPIPE_HOME, not into MLflow, not into an
error message.

Every job runs as a user runs it, ``python -m jobs.cli <job> ...`` in a subprocess, with a
distinctive value in each variable the scrubber treats as a secret: the real S3 keys of the
test SeaweedFS (they must stay valid), ``MLFLOW_TRACKING_PASSWORD``,
``MLFLOW_TRACKING_TOKEN`` and two generic ones (``FMPIPE_TEST_SECRET``, ``SOME_API_TOKEN``);
``RAY_AUTH_TOKEN`` only for the submit case (it changes Ray's auth). A tiny successful
prepare + train (digits at 8x8, a few hundred images, checkpoints, MLflow params and tags, a
registered model) and failing train, sample and submit runs; then every console output,
every file under $FMPIPE_HOME (bytes, checkpoints and the MLflow database included), every
object the jobs wrote to S3, and every MLflow param and tag is searched for each value. The
failures: a train whose data URI carries credentials (``s3://KEY:PASSWORD@bucket/...``), a
sample of a model that does not exist, and submits with a secret ``--env`` or no cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from localray import TRAIN_POLL_S
from tiny import tiny_unet_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Built at run time, so no secret sits whole in this file (a traceback shows source lines).
GENERIC = {
    "MLFLOW_TRACKING_PASSWORD": "mlfl0w-pw-" + "9f8e7d6c5b",
    "MLFLOW_TRACKING_TOKEN": "mlfl0w-tok-" + "1a2b3c4d5e",
    "FMPIPE_TEST_SECRET": "fmp1pe-secret-" + "0a9b8c7d",
    "SOME_API_TOKEN": "s0me-api-tok-" + "5e6f7a8b",
}
RAY_TOKEN = "ray-t0ken-" + "c0ffee" * 8
URI_PASSWORD = "ur1-pa55-" + "d3adbeef"
TINY_TRAIN = [
    "data.resolution=8",
    "data.batch_size=32",
    *tiny_unet_overrides(),
    "model.num_classes=10",
    "train.warmup_images=32",
    "train.ema_halflife_images=64",
    "train.checkpoint_every_images=64",
    "train.val_every_images=1000000",
    "train.val_max_images=64",
    "train.grid_every_images=1000000",
    "train.grid_steps=4",
    "train.log_every_steps=2",
    "train.max_failures=0",
    "train.cpus_per_worker=0.5",
    "train.torch_threads=1",
]


@pytest.fixture(scope="module")
def secret_env(s3_server, tmp_path_factory) -> dict[str, str]:
    """The jobs' environment: the test S3 (real keys), embedded MLflow under a fresh
    $FMPIPE_HOME, and a distinctive value in every other scrubbed variable."""
    home = tmp_path_factory.mktemp("secrets") / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "MLFLOW_"))
    }
    env.update(s3_server.env())
    env.update(GENERIC)
    env.update(
        FMPIPE_HOME=str(home),
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=TRAIN_POLL_S,
        RAY_USAGE_STATS_ENABLED="0",
        HOME=str(home.parent / "user"),  # no ~/.ray/auth_token of the machine's user
    )
    return env


def _secrets(env: dict[str, str]) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        **GENERIC,
        "RAY_AUTH_TOKEN": RAY_TOKEN,
        "uri password": URI_PASSWORD,
    }


def fmpipe(env: dict[str, str], *args: str, timeout: float = 300) -> tuple[int, str]:
    """``python -m jobs.cli <args>``: (exit status, stdout + stderr)."""
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    took = time.monotonic() - began
    print(
        f"$ fmpipe {' '.join(args)}  ({took:.1f} s)\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.returncode, proc.stdout + proc.stderr


def _leaks(blob: bytes | str, secrets: dict[str, str]) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [name for name, value in secrets.items() if value.encode() in data]


@pytest.fixture(scope="module")
def runs(secret_env, s3_server) -> dict[str, tuple[int, str]]:
    """Every job run of the scenario: name -> (exit status, console output)."""
    from pipeline.stack.procs import free_port
    from pipeline.storage import boto3_client

    bucket = "secrets-" + os.urandom(4).hex()
    boto3_client().create_bucket(Bucket=bucket)
    data = f"s3://{bucket}/digits"
    out: dict[str, tuple[int, str]] = {}
    env = secret_env
    out["prepare"] = fmpipe(
        env, "prepare", "--source", "digits", "--out", data, "--resolution", "8"
    )
    out["train"] = fmpipe(
        env, "train", "--data", data, "--run-name", "leak-check", "--images", "128", *TINY_TRAIN
    )
    out["train: credentials in the URI"] = fmpipe(
        env, "train", "--data", f"s3://{env['AWS_ACCESS_KEY_ID']}:{URI_PASSWORD}@{bucket}/digits"
    )
    out["sample: bad model"] = fmpipe(
        env, "sample", "--model", "models:/no-such-model@champion", "--out", f"s3://{bucket}/s"
    )
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens
    submit_env = {**env, "RAY_AUTH_TOKEN": RAY_TOKEN}
    for name in ("AWS_SECRET_ACCESS_KEY", "FMPIPE_TEST_SECRET", "RAY_AUTH_TOKEN"):
        out[f"submit --env {name}"] = fmpipe(
            submit_env, "submit", "train", "--env", name, "--address", address
        )
    out["submit: no cluster there"] = fmpipe(submit_env, "submit", "train", "--address", address)
    out["bucket"] = (0, bucket)
    return out


def test_jobs_ran_as_expected(runs) -> None:
    """The scenario is what it claims: the tiny train succeeded, each failure failed with its
    own error (so the other tests search real outputs)."""
    assert runs["prepare"][0] == 0 and runs["train"][0] == 0, runs["train"][1][-3000:]
    assert "trained to 128 images" in runs["train"][1]
    for name, (rc, output) in runs.items():
        if name.startswith(("train:", "sample:", "submit")):
            assert rc != 0, (name, output)
    assert "must not carry credentials" in runs["train: credentials in the URI"][1]
    assert "no-such-model" in runs["sample: bad model"][1]
    for name in ("AWS_SECRET_ACCESS_KEY", "FMPIPE_TEST_SECRET"):
        assert "secrets are not sent with a job" in runs[f"submit --env {name}"][1]
    assert "own token" in runs["submit --env RAY_AUTH_TOKEN"][1]
    assert "cannot reach" in runs["submit: no cluster there"][1]


def test_no_secret_on_the_console(runs, secret_env) -> None:
    secrets = _secrets(secret_env)
    leaked = {name: _leaks(output, secrets) for name, (_, output) in runs.items()}
    assert {name: found for name, found in leaked.items() if found} == {}


def test_no_secret_in_any_file_under_the_home(runs, secret_env) -> None:
    home = Path(secret_env["FMPIPE_HOME"])
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any("checkpoint_" in str(p) for p in files), "no checkpoint to search"
    assert (home / "mlflow.db").is_file()
    secrets = _secrets(secret_env)
    leaked = {}
    for path in files:
        found = _leaks(path.read_bytes(), secrets) + _leaks(str(path), secrets)
        if found:
            leaked[str(path.relative_to(home))] = found
    assert leaked == {}


def test_no_secret_in_what_the_jobs_wrote_to_s3(runs, secret_env) -> None:
    from pipeline.storage import boto3_client

    client = boto3_client()
    bucket = runs["bucket"][1]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(key.endswith("_manifest.json") for key in keys)
    secrets = _secrets(secret_env)
    leaked = {}
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if found := _leaks(body, secrets) + _leaks(key, secrets):
            leaked[key] = found
    assert leaked == {}


def test_no_secret_in_mlflow_params_or_tags(runs, secret_env) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{Path(secret_env['FMPIPE_HOME']) / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = client.search_experiments()
    found_runs = client.search_runs([e.experiment_id for e in experiments])
    assert found_runs, "the tiny train logged no run"
    assert any(r.data.params.get("train.total_images") == "128" for r in found_runs)
    records = [
        {"params": r.data.params, "tags": r.data.tags, "name": r.info.run_name} for r in found_runs
    ]
    for model in client.search_registered_models():
        records.append({"model": model.name, "tags": model.tags})
        for version in client.search_model_versions(f"name = '{model.name}'"):
            records.append({"version": version.version, "tags": version.tags})
    assert _leaks(json.dumps(records), _secrets(secret_env)) == []
