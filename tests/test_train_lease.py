"""One writer per run: ``train()`` under the run lease, with local Ray, the real MLflow server
and SeaweedFS (issue 17, item 3).

Two ``train()`` calls with one run name at the same instant: exactly one trains; the other
raises LeaseHeldError at once, naming the holder, and leaves nothing in MLflow or the run
directory. A run lease left by a killed process is taken over (locally at once, on S3 after
it expires). ``fmpipe train`` says so in one line, exit 1. The tiny in-memory setup of
tests/test_train_ray.py keeps each run to seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from localray import local_ray
from tiny import TINY_UNET, tiny_unet_overrides

from pipeline.config import build_config
from pipeline.train.data import InMemorySource

REPO = Path(__file__).resolve().parents[1]
TOTAL = 24  # 3 steps of 8


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """Local Ray for this module (tests/localray.py), after the S3 env is set."""
    with local_ray():
        yield


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> str:
    """``train.storage_path``: a local directory, or a prefix in a fresh SeaweedFS bucket."""
    if request.param == "s3":
        return f"{request.getfixturevalue('s3_bucket')}/runs"
    return str(tmp_path / "runs")


def tiny_cfg(storage: str, name: str, tracking_uri: str = "", experiment: str = "fmpipe"):
    return build_config(
        {
            "seed": 0,
            "data": {"resolution": 8, "channels": 1, "batch_size": 8},
            "model": {**TINY_UNET, "num_classes": 3},
            "train": {
                "run_name": name,
                "storage_path": storage,
                "total_images": TOTAL,
                "warmup_images": 8,
                "num_workers": 1,
                "cpus_per_worker": 1,
                "torch_threads": 1,
                "checkpoint_every_images": 16,
                "log_every_steps": 1,
                "val_every_images": 10**6,
                "grid_every_images": 10**6,
                "max_failures": 0,
            },
            "tracking": {"uri": tracking_uri, "experiment": experiment},
        }
    )


def in_memory() -> InMemorySource:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=gen) * 2 - 1
    return InMemorySource(x, torch.arange(32) % 3, seed=1)


def train_tiny(cfg, track: bool):
    from pipeline.train.trainer import train

    return train(cfg, batch_source=in_memory(), data_shape=(1, 8, 8), print_fn=None, track=track)


def run_info(storage: str, name: str) -> dict:
    from pipeline.storage import resolve
    from pipeline.train.trainer import RUN_INFO_FILE

    return json.loads(resolve(f"{storage}/{name}/{RUN_INFO_FILE}").read_bytes().decode())


def assert_run_lease_free(cfg) -> None:
    from pipeline.lease import open_run_lease

    lease = open_run_lease(cfg)
    assert lease.acquire(), f"the run lease {lease.uri} is still held: {lease.holder()}"
    lease.release()


# --------------------------------------------------------------------------- two at once
def test_two_trains_with_one_name_one_trains_the_other_is_refused_at_once(
    ray_local, storage, mlflow_server, monkeypatch
):
    """Both calls reach the run lease at the same instant (a barrier after it is opened):
    one trains to the end; the other raises LeaseHeldError naming this process while the
    first still trains, and starts no MLflow run and writes nothing to the run."""
    from mlflow import MlflowClient

    import pipeline.lease as lease_module
    from pipeline.lease import LeaseError, LeaseHeldError

    name, experiment = "twice", f"lease-{uuid.uuid4().hex[:8]}"
    cfg = tiny_cfg(storage, name, mlflow_server.uri, experiment)
    barrier = threading.Barrier(2, timeout=60)
    real_open = lease_module.open_run_lease

    def open_together(*args, **kwargs):
        lease = real_open(*args, **kwargs)
        barrier.wait()  # both runs passed their checks and now race for the lease
        return lease

    monkeypatch.setattr(lease_module, "open_run_lease", open_together)
    outcomes: list[tuple[str, object, float]] = []

    def attempt() -> None:
        try:
            outcomes.append(("trained", train_tiny(cfg, track=True), time.monotonic()))
        except BaseException as exc:
            outcomes.append(("raised", exc, time.monotonic()))

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(kind for kind, _, _ in outcomes) == ["raised", "trained"], outcomes
    (_, won, won_at), (_, refused, refused_at) = sorted(outcomes, key=lambda o: o[0] != "trained")
    assert isinstance(refused, LeaseHeldError) and isinstance(refused, LeaseError), refused
    assert won.images_seen == TOTAL
    assert refused_at < won_at  # refused while the other still trained: at once

    message = str(refused)
    who = f"{socket.gethostname()}:{os.getpid()}"
    assert "\n" not in message
    assert f"run '{name}' is already being trained by {who} since " in message
    assert "pick another run name" in message

    # nothing of the refused run reached MLflow or the run directory
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [won.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"
    assert run_info(storage, name)["mlflow_run_id"] == won.mlflow_run_id
    monkeypatch.undo()  # the real open_run_lease again, without the barrier
    assert_run_lease_free(cfg)  # released at the end of the winning run


# --------------------------------------------------------------------------- a dead holder
HOLDER = """
import sys, time
from pipeline.config import build_config
from pipeline.lease import hold_run_lease

cfg = build_config({"train": {"run_name": sys.argv[1], "storage_path": sys.argv[2]}})
with hold_run_lease(cfg, ttl=float(sys.argv[3])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_run_lease_left_by_a_killed_process_is_taken_over(ray_local, storage, caplog):
    """Another process holds the run (its heartbeat renews it): train() is refused and names
    that process; SIGKILL it (no release): locally the kernel frees the flock at once; on S3
    the lease is still unexpired, but its holder ran on this host and is gone, so train()
    takes it over at once (a holder on another host waits for the TTL) and trains."""
    from pipeline.lease import LeaseHeldError, open_run_lease

    name, ttl = "orphan", 4.0
    cfg = tiny_cfg(storage, name)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, storage, str(ttl)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held", proc.stderr.read()
        with pytest.raises(LeaseHeldError) as refused:
            train_tiny(cfg, track=False)
        assert f"by {socket.gethostname()}:{proc.pid} since " in str(refused.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    if storage.startswith("s3://"):  # not expired: taken over because its holder is gone
        assert (open_run_lease(cfg).holder() or {}).get("expires_at", 0) > time.time()
    with caplog.at_level("WARNING", logger="pipeline.lease"):
        result = train_tiny(cfg, track=False)
    assert result.images_seen == TOTAL
    took_over = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert bool(took_over) == storage.startswith("s3://"), took_over
    assert_run_lease_free(cfg)


# --------------------------------------------------------------------------- fmpipe train
def test_fmpipe_train_refuses_a_held_run_in_one_line_and_touches_nothing(
    mlflow_server, tmp_path, monkeypatch, capsys
):
    """The job maps the refusal to one line on stderr and exit 1; no MLflow run is started
    and the run directory is not created (the lease is taken before either)."""
    from mlflow import MlflowClient

    from jobs import train as train_job
    from pipeline.data.prepare import prepare_dataset
    from pipeline.lease import hold_run_lease

    data, storage, name = str(tmp_path / "digits"), str(tmp_path / "runs"), "held"
    prepare_dataset(
        build_config({"prepare": {"source": "digits", "out": data, "resolution": 8}}), log=None
    )
    experiment = f"lease-cli-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    argv = [
        "--data", data, "--storage", storage, "--run-name", name, "--images", "64",
        "data.resolution=8", "data.channels=1", "model.num_classes=10",
        f"tracking.experiment={experiment}", *tiny_unet_overrides(),
    ]  # fmt: skip
    with hold_run_lease(tiny_cfg(storage, name)):  # held by "another run" (this process)
        capsys.readouterr()
        rc = train_job.main(argv)
        err = capsys.readouterr().err
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    who = f"{socket.gethostname()}:{os.getpid()}"
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fmpipe train: error: run '{name}' is already being trained by ")
    assert who in lines[0] and "pick another run name" in lines[0]
    assert MlflowClient(tracking_uri=mlflow_server.uri).get_experiment_by_name(experiment) is None
    assert sorted(p.name for p in Path(storage).iterdir()) == ["_locks"]
