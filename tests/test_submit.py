"""`fmpipe submit` against a real two-node Ray cluster (tests/cluster.py), SeaweedFS and MLflow.

The nodes start with token auth and with S3 credentials of their own in their environment (as
a real cluster has them: node environment, instance role or a Kubernetes Secret), but WITHOUT
the S3 endpoint or MLflow URI: those come through `fmpipe submit`, carried automatically.
Secrets never travel with a job: `--env AWS_SECRET_ACCESS_KEY` is refused before the cluster
is contacted, and the runtime_env of every job, read back through the Jobs API, holds no
secret value. Through it: prepare (digits 8x8 to S3), train (2 workers, STRICT_SPREAD: one
per node), sample; each succeeds with its outputs in S3 and its runs in MLflow; a job that
fails makes submit exit non-zero with the job's error shown; a wrong token is refused. Plus
fast checks of the command-line split, the token rules and what the job's environment carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import LocalRayCluster

from pipeline.config import build_config

pytestmark = pytest.mark.serial  # its own Ray cluster: alone, not beside another file

REPO = Path(__file__).resolve().parent.parent
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
TINY = [
    "data.resolution=8",
    "data.batch_size=32",
    "model.base_channels=8",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[]",
    "model.num_heads=2",
    "model.norm_groups=4",
    "train.warmup_images=32",
    "train.ema_halflife_images=64",
    "train.checkpoint_every_images=1000000",
    "train.val_every_images=1000000",
    "train.val_max_images=64",
    "train.grid_every_images=1000000",
    "train.grid_steps=4",
    "train.log_every_steps=2",
    "train.max_failures=0",
]


@pytest.fixture(scope="module")
def cluster(s3_server, mlflow_server):
    """Two nodes (2 CPUs each, resources node_a / node_b); S3 credentials in their
    environment, no S3 endpoint or MLflow URI."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "MLFLOW_")) and k not in ("FMPIPE_HOME",)
    }
    env.update({name: s3_server.env()[name] for name in CREDENTIALS})  # the nodes' own keys
    with LocalRayCluster(env=env, head_cpus=2, worker_cpus=2) as c:
        yield c


@pytest.fixture
def submit_env(cluster, mlflow_server, s3_server, tmp_path):
    """The submitter's environment: S3 (endpoint + credentials), MLflow, the cluster token."""
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    env.update(s3_server.env())
    env.update(cluster.client_env())
    env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    env["FMPIPE_HOME"] = str(tmp_path / "home")
    return env


def fmpipe_submit(env: dict[str, str], address: LocalRayCluster | str, *args: str):
    """``fmpipe submit <args> --address <cluster>`` in a subprocess; (rc, stdout, stderr)."""
    url = address if isinstance(address, str) else address.address
    cmd = [sys.executable, "-m", "jobs.cli", "submit", *args, "--address", url]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:], sep="\n")  # shown when a test fails
    for name in CREDENTIALS:
        if env.get(name):
            assert env[name] not in proc.stdout + proc.stderr, "a credential was printed"
    return proc.returncode, proc.stdout, proc.stderr


def train_workers(cluster: LocalRayCluster) -> list[dict]:
    status, body = cluster.get(
        "/api/v0/actors?limit=1000&detail=1"
        "&filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker"
    )
    assert status == 200, body
    return body["data"]["result"]["result"]


@pytest.mark.slow
def test_submit_prepare_train_sample_on_two_nodes(cluster, submit_env, s3_bucket, mlflow_server):
    from mlflow import MlflowClient

    from pipeline.data.manifest import MANIFEST_NAME, Manifest
    from pipeline.data.stream import open_dataset
    from pipeline.storage import resolve

    data, runs, samples = f"{s3_bucket}/digits", f"{s3_bucket}/runs", f"{s3_bucket}/samples"
    model = f"cluster-{s3_bucket[-8:]}"
    ids = cluster.node_ids()
    assert set(ids) == {"node_a", "node_b"} and ids["node_a"] != ids["node_b"]

    # ---- prepare: digits at 8x8 into S3
    rc, out, err = fmpipe_submit(
        submit_env, cluster, "prepare", "--source", "digits", "--out", data, "--resolution", "8"
    )
    assert rc == 0, err
    assert "SUCCEEDED" in err
    carried = next(line for line in err.splitlines() if "environment carried" in line)
    for name in ("AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"):
        assert name in carried
    assert not any(name in carried for name in CREDENTIALS)  # the nodes have their own
    _assert_no_secret_in_jobs(cluster, submit_env)
    info = open_dataset(build_config({"data": {"uri": data, "resolution": 8}}), "train")
    assert info.num_samples > 1000

    # ---- train: 2 workers, one per node (STRICT_SPREAD), checkpoints to S3, MLflow
    before = {a["actor_id"] for a in train_workers(cluster)}
    rc, out, err = fmpipe_submit(
        submit_env,
        cluster,
        "train",
        "--data",
        data,
        "--storage",
        runs,
        "--run-name",
        "on-cluster",
        "--workers",
        "2",
        "--images",
        "128",
        "train.placement_strategy=STRICT_SPREAD",
        "train.cpus_per_worker=0.5",
        f"train.registered_model_name={model}",
        "tracking.experiment=cluster-test",
        *TINY,
    )
    assert rc == 0, err
    assert "2 worker(s) x micro-batch 16" in out
    assert "trained to 128 images" in out
    workers = [a for a in train_workers(cluster) if a["actor_id"] not in before]
    assert len(workers) == 2, workers
    assert {w["node_id"] for w in workers} == {ids["node_a"], ids["node_b"]}

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("cluster-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "on-cluster"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags["fmpipe.manifest_hash"] == info.manifest.content_hash()
    # the commit of the submitting checkout travels with the job (.git is not shipped)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    if commit:
        assert run.data.tags["fmpipe.git_commit"] == commit
    (version,) = client.search_model_versions(f"name = '{model}'")
    run_dir = resolve(f"{runs}/on-cluster")
    assert any(n.startswith("checkpoint_") for n in run_dir.list_names())

    # ---- sample: from the registry, shards + manifest to S3, a run in MLflow
    rc, out, err = fmpipe_submit(
        submit_env,
        cluster,
        "sample",
        "--model",
        f"models:/{model}/{version.version}",
        "--num-samples",
        "24",
        "--out",
        samples,
        "--steps",
        "4",
        "--batch-size",
        "12",
        "tracking.sample_experiment=cluster-samples",
    )
    assert rc == 0, err
    manifest = Manifest.from_json(resolve(samples).child(MANIFEST_NAME).read_bytes().decode())
    assert manifest.num_samples == 24
    assert all(resolve(samples).child(s.name).exists() for s in manifest.shards)
    sample_runs = client.search_runs(
        [client.get_experiment_by_name("cluster-samples").experiment_id]
    )
    assert len(sample_runs) == 1 and sample_runs[0].info.status == "FINISHED"
    _assert_no_secret_in_jobs(cluster, submit_env)


def _secret_values(env: dict[str, str], cluster: LocalRayCluster) -> list[str]:
    return [env[name] for name in CREDENTIALS] + [cluster.token_path.read_text().strip()]


def _assert_no_secret_in_jobs(cluster: LocalRayCluster, env: dict[str, str]) -> None:
    """Every job's record as the Jobs API returns it (runtime_env, entrypoint, metadata)
    holds no secret value: what `ray job list` shows to every holder of the token."""
    status, jobs = cluster.get("/api/jobs/")
    assert status == 200 and isinstance(jobs, list) and jobs, jobs
    assert all("env_vars" in (job.get("runtime_env") or {}) for job in jobs)
    dumped = json.dumps(jobs)
    for value in _secret_values(env, cluster):
        assert value not in dumped, "a secret is in a job's record"


@pytest.mark.slow
def test_failed_job_and_wrong_token(cluster, submit_env, s3_bucket, tmp_path):
    """A job that fails: non-zero exit with the job's own error; a bad token: refused."""
    rc, out, err = fmpipe_submit(
        submit_env, cluster, "train", "--data", f"{s3_bucket}/none", "train.bogus_key=1"
    )
    assert rc == 1
    assert "FAILED" in err
    assert "unknown config key 'train.bogus_key'" in out + err

    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    env = {**submit_env, "RAY_AUTH_TOKEN_PATH": str(wrong)}
    rc, out, err = fmpipe_submit(env, cluster, "prepare", "--source", "digits")
    assert rc == 2
    assert "refused the token" in err and "Invalid authentication token" in err
    assert "0" * 64 not in out + err


@pytest.mark.slow
def test_secret_env_is_refused_before_submitting(cluster, submit_env):
    """`--env AWS_SECRET_ACCESS_KEY` on a live cluster: exit 2 with the way credentials reach
    a cluster, nothing submitted, the value nowhere; no job record holds a secret."""
    _, before = cluster.get("/api/jobs/")
    for name in (*CREDENTIALS, "MLFLOW_TRACKING_PASSWORD"):
        env = {**submit_env, "MLFLOW_TRACKING_PASSWORD": "pw-" + "for-this-test-only"}
        rc, out, err = fmpipe_submit(env, cluster, "prepare", "--source", "digits", "--env", name)
        assert rc == 2, err
        assert f"--env {name} refused: secrets are not sent with a job" in err
        assert "secretKeyRef" in err and "instance role" in err
        assert env[name] not in out + err
    _, after = cluster.get("/api/jobs/")
    assert len(after) == len(before)  # nothing was submitted
    if after:
        _assert_no_secret_in_jobs(cluster, submit_env)


# --------------------------------------------------------------------------- fast: the rules
def test_command_line_split():
    from jobs.submit import parse

    p = parse(["train", "--data", "s3://d", "--address", "http://h:8265", "--env", "A", "x.y=1"])
    assert (p.job, p.job_args, p.address, p.env_names, p.wait) == (
        "train",
        ["--data", "s3://d", "x.y=1"],
        "http://h:8265",
        ["A"],
        True,
    )
    p = parse(["--no-wait", "--env=B", "sample", "--", "--address", "kept-for-the-job"])
    assert (p.job, p.job_args, p.env_names, p.wait) == (
        "sample",
        ["--address", "kept-for-the-job"],
        ["B"],
        False,
    )
    with pytest.raises(ValueError):
        parse(["--address"])


def test_token_rules(tmp_path, monkeypatch):
    from pipeline.submit import SubmitError, auth_headers

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    token = tmp_path / "token"
    token.write_text("t0k3n-value\n")
    assert auth_headers({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}) == {
        "Authorization": "Bearer t0k3n-value"
    }
    assert auth_headers({"RAY_AUTH_TOKEN": "direct", "RAY_AUTH_TOKEN_PATH": str(token)}) == {
        "Authorization": "Bearer direct"
    }  # mode unset but a token exists: sent (such a cluster requires it)
    assert auth_headers({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}) == {}
    assert auth_headers({}) == {}
    with pytest.raises(SubmitError, match="no token"):
        auth_headers({"RAY_AUTH_MODE": "token"})
    with pytest.raises(SubmitError, match="cannot be read"):
        auth_headers({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})


def test_runtime_env_carries_locations_and_refuses_secrets():
    from pipeline.submit import EXCLUDES, SubmitError, build_runtime_env

    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_ENDPOINT_URL_S3": "http://s3:8333",
        "AWS_ACCESS_KEY_ID": "AKIDVALUE",
        "AWS_SECRET_ACCESS_KEY": "SECRETVALUE",
        "SOME_API_TOKEN": "tok-value-123",
        "UNRELATED": "x",
    }
    runtime_env, names = build_runtime_env(env=env)
    assert runtime_env["working_dir"] == str(REPO)
    assert {".venv", ".git", ".fmpipe"} <= set(runtime_env["excludes"]) == set(EXCLUDES)
    carried = runtime_env["env_vars"]
    assert carried["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "AWS_SECRET_ACCESS_KEY" not in carried and "UNRELATED" not in carried
    runtime_env, names = build_runtime_env(["UNRELATED"], env=env)  # by name: carried
    assert runtime_env["env_vars"]["UNRELATED"] == "x" and "UNRELATED" in names
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SOME_API_TOKEN"):
        with pytest.raises(SubmitError, match="secrets are not sent with a job") as info:
            build_runtime_env([secret], env=env)
        assert env[secret] not in str(info.value) and "secretKeyRef" in str(info.value)
    with pytest.raises(SubmitError, match="MLFLOW_TRACKING_URI holds a credential") as info:
        build_runtime_env(env={**env, "MLFLOW_TRACKING_URI": "https://me:pa55word@mlflow"})
    assert "pa55word" not in str(info.value)
    with pytest.raises(SubmitError, match="NAME"):
        build_runtime_env(["AWS_SECRET_ACCESS_KEY=inline"], env=env)
    with pytest.raises(SubmitError, match="not set"):
        build_runtime_env(["MISSING_VAR"], env=env)
    with pytest.raises(SubmitError, match="own token"):
        build_runtime_env(["RAY_AUTH_TOKEN"], env={**env, "RAY_AUTH_TOKEN": "x"})


def test_secret_env_fails_before_contacting_a_cluster(tmp_path):
    """Nothing listens at the address: a secret --env is refused first (exit 2, its own
    message, the value nowhere), not a connection error."""
    from pipeline.stack.procs import free_port

    value = "s3cr3t-" + "never-shown-42"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": value, "FMPIPE_HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    address = f"http://127.0.0.1:{free_port()}"
    rc, out, err = fmpipe_submit(env, address, "train", "--env", "AWS_SECRET_ACCESS_KEY")
    assert rc == 2
    assert "--env AWS_SECRET_ACCESS_KEY refused: secrets are not sent with a job" in err
    assert "cannot reach" not in err and value not in out + err


def test_entrypoint_and_address():
    from pipeline.submit import SubmitError, entrypoint, resolve_address

    assert entrypoint("train", ["--data", "s3://a b", "x=[1,2]"]) == (
        "python -m jobs.train --data 's3://a b' 'x=[1,2]'"
    )
    assert resolve_address("http://h:8265/", {"RAY_ADDRESS": "http://other:1"}) == "http://h:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://r:8265"}) == "http://r:8265"
    assert (
        resolve_address(None, {"RAY_ADDRESS": "http://r:1", "RAY_API_SERVER_ADDRESS": "http://a:2"})
        == "http://a:2"
    )
    with pytest.raises(SubmitError, match="no Ray cluster"):
        resolve_address(None, {})


@pytest.mark.slow
def test_an_explicit_address_wins_over_ray_address_in_the_environment(cluster, monkeypatch):
    """pipeline.rayenv.scoped_environ hides RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the
    client is built: without it, a stale variable would send the client elsewhere."""
    from pipeline.submit import auth_headers, jobs_client

    for name, value in cluster.client_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    client = jobs_client(cluster.address, auth_headers())
    assert isinstance(client.list_jobs(), list)
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:9"  # put back afterwards
