"""Scheduled retraining against the real MLflow server and SeaweedFS: promotion, no-op ticks,
rejection, and the lease + compare-and-set that keeps concurrent runs from both promoting
(the leases themselves: tests/test_lease.py).

Digits at 8x8 (written by the real `prepare` into S3), a tiny U-Net, a few hundred images
per candidate, one local Ray for the module (the tests that train are marked slow; the lease
and compare-and-set tests need only the servers).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from localray import local_ray

from pipeline.config import build_config
from pipeline.storage import resolve

TINY_MODEL = {
    "kind": "unet",
    "base_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "num_heads": 2,
    "norm_groups": 4,
    "num_classes": 10,
}


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """Local Ray for this module (tests/localray.py), after the S3 env is set."""
    with local_ray():
        yield


@pytest.fixture
def env(mlflow_server, tmp_path, monkeypatch):
    """The deployment's environment: MLflow from MLFLOW_TRACKING_URI, a private home."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    return mlflow_server.uri


def prepare(uri: str, seed: int) -> str:
    """Digits at 8x8 into ``uri`` with split seed ``seed``; returns the train manifest hash."""
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.stream import open_dataset

    cfg = build_config({"seed": seed, "prepare": {"source": "digits", "out": uri, "resolution": 8}})
    prepare_dataset(cfg, log=None)
    return open_dataset(
        build_config({"data": {"uri": uri, "resolution": 8}}), "train"
    ).manifest.content_hash()


def retrain_cfg(data_uri: str, storage: str, name: str, *overrides: str, **retrain):
    settings = {"images": 512, "promote_margin": 0.0, "from_scratch": False, **retrain}
    return build_config(
        {
            "seed": 0,
            "data": {"uri": data_uri, "resolution": 8, "channels": 1, "batch_size": 32},
            "model": TINY_MODEL,
            "train": {
                "run_name": name,
                "storage_path": storage,
                "lr": 3e-3,
                "warmup_images": 32,
                "ema_halflife_images": 64,
                "ema_warmup_ratio": 0.1,
                "num_workers": 1,
                "cpus_per_worker": 1,
                "torch_threads": 1,
                "checkpoint_every_images": 10**6,
                "log_every_steps": 1,
                "val_every_images": 10**6,
                "val_max_images": 128,
                "grid_every_images": 10**6,
                "grid_steps": 4,
                "max_failures": 0,
                "registered_model_name": name,
            },
            "tracking": {"experiment": f"retrain-{name}"},
            "retrain": settings,
        },
        list(overrides),
    )


def run(cfg):
    from pipeline.retrain import retrain

    lines: list[str] = []

    def say(line: str) -> None:  # kept for asserts, and shown by pytest when a test fails
        lines.append(line)
        print(line)

    result = retrain(cfg, print_fn=say)
    result.extra["lines"] = lines
    return result


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(c, name: str) -> list:
    return sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def champion(c, name: str) -> str | None:
    return dict(c.get_registered_model(name).aliases).get("champion")


def first_loss(c, run_id: str) -> float:
    history = sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    return history[0].value


def race_two_retrains(cfg):
    """Two retrains of ``cfg`` that reach the lease at the same moment (a barrier after the
    fast path): exactly one must get it; returns that one's result, the other's checked."""
    import pipeline.retrain as retrain_module

    barrier = threading.Barrier(2, timeout=60)
    real_open_lease = retrain_module.open_lease

    def open_lease_together(*args, **kwargs):
        lease = real_open_lease(*args, **kwargs)
        barrier.wait()  # both runs passed the fast path and now race for the lease
        return lease

    results: list = [None, None]

    def worker(i: int) -> None:
        results[i] = run(cfg)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrain_module, "open_lease", open_lease_together)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
    assert all(r is not None for r in results), "a racing retrain did not finish"
    outcomes = sorted(r.outcome for r in results)
    assert outcomes == ["busy", "promoted"], [r.extra["lines"] for r in results]
    busy = next(r for r in results if r.outcome == "busy")
    assert "another retrain" in busy.message
    return next(r for r in results if r.outcome == "promoted")


# --------------------------------------------------------------------------- the lifecycle
@pytest.mark.slow
def test_retrain_lifecycle(ray_local, env, s3_bucket, tmp_path):
    """No champion -> train + promote (two retrains racing for it: one trains, one reports
    busy); same data -> nothing; new data -> continue from the champion, evaluate, promote
    or reject by the metric; a worse candidate -> rejected and the alias stays; the same
    data again -> not retrained. One scenario, so the Ray Train runs are shared."""
    data, storage, name = f"{s3_bucket}/digits", f"{s3_bucket}/runs", "digits-rt"
    c = client(env)
    hash_1 = prepare(data, seed=0)

    # 1. no champion, two retrains at the same moment: one trains from scratch, registers
    # and promotes, the other reports busy; one version, promoted once
    first = race_two_retrains(retrain_cfg(data, storage, name))
    assert first.outcome == "promoted", first.extra["lines"]
    assert [v.version for v in versions(c, name)] == ["1"]
    assert first.champion_version is None and first.champion_val_loss is None
    assert champion(c, name) == first.candidate_version == "1"
    v1 = c.get_model_version(name, "1")
    assert v1.tags["manifest_hash"] == hash_1
    assert v1.tags["fmpipe.retrain.decision"] == "promoted"
    assert v1.tags["fmpipe.retrain.init"] == "scratch"
    assert v1.tags["fmpipe.retrain.base_version"] == "none"
    assert v1.tags["images_seen"] == "512"
    assert float(v1.tags["val_loss"]) == pytest.approx(first.candidate_val_loss, rel=1e-4)
    # the evaluation is the trainer's own validation: same weights, same draws, same number
    run_1 = c.get_run(first.mlflow_run_id)
    assert run_1.data.metrics["val_loss"] == pytest.approx(first.candidate_val_loss, rel=1e-5)
    assert run_1.data.tags["fmpipe.retrain.decision"] == "promoted"

    # 2. no new data: nothing trained, nothing registered, the tick is recorded
    runs_before = len(c.search_runs([run_1.info.experiment_id]))
    second = run(retrain_cfg(data, storage, name))
    assert second.outcome == "no_new_data", second.extra["lines"]
    assert "no new data" in second.message
    assert len(versions(c, name)) == 1 and champion(c, name) == "1"
    assert len(c.search_runs([run_1.info.experiment_id])) == runs_before
    assert c.get_registered_model(name).tags["fmpipe.retrain.last_outcome"] == "no_new_data"

    # 3. new shards: a candidate continues from the champion, decided by the metric
    hash_2 = prepare(data, seed=1)
    assert hash_2 != hash_1
    third = run(retrain_cfg(data, storage, name, images=256))
    assert third.outcome in ("promoted", "rejected"), third.extra["lines"]
    assert third.champion_version == "1" and third.candidate_version == "2"
    better = third.candidate_val_loss < third.champion_val_loss - 0.0
    assert third.promoted == better
    assert champion(c, name) == ("2" if better else "1")
    v2 = c.get_model_version(name, "2")
    assert v2.tags["manifest_hash"] == hash_2
    assert v2.tags["fmpipe.retrain.base_version"] == "1"
    assert v2.tags["fmpipe.retrain.init"] == "champion"
    assert float(v2.tags["champion_val_loss"]) == pytest.approx(third.champion_val_loss, rel=1e-4)
    assert v2.tags["fmpipe.retrain.decision"] == ("promoted" if better else "rejected")
    assert ("rejected" in v2.tags) == (not better)
    # it really started from the champion's weights: the loop's own initialisation took
    # them (InitWeights, no separate Ray Train run, no checkpoint 0), the run says so, and
    # its first step's loss is already below the first loss of the from-scratch run
    assert any("starts from models:/digits-rt/1" in line for line in third.extra["lines"])
    assert any("[train] starting:" in line for line in third.extra["lines"])
    third_run = c.get_run(third.mlflow_run_id)
    assert third_run.data.tags["fmpipe.init_from"] == f"models:/{name}/1"
    assert not resolve(f"{storage}/{third.run_name}/checkpoint_000000000000").exists()
    assert first_loss(c, third.mlflow_run_id) < 0.9 * first_loss(c, first.mlflow_run_id)

    # 4. new shards and a candidate forced to be worse (fresh weights, no learning): rejected
    before = champion(c, name)
    prepare(data, seed=2)
    worse_cfg = retrain_cfg(data, storage, name, "train.lr=1e-9", images=32, from_scratch=True)
    fourth = run(worse_cfg)
    assert fourth.outcome == "rejected", fourth.extra["lines"]
    assert fourth.candidate_val_loss > fourth.champion_val_loss
    assert champion(c, name) == before  # the alias did not move
    v3 = c.get_model_version(name, fourth.candidate_version)
    assert v3.tags["fmpipe.retrain.decision"] == "rejected"
    assert "not below the champion" in v3.tags["rejected"]
    model_tags = c.get_registered_model(name).tags
    assert model_tags["fmpipe.retrain.last_outcome"] == "rejected"

    # 5. the same data and champion again: already decided, not retrained
    count = len(versions(c, name))
    fifth = run(worse_cfg)
    assert fifth.outcome == "already_evaluated", fifth.extra["lines"]
    assert f"version {fourth.candidate_version} was rejected" in fifth.message
    assert len(versions(c, name)) == count and champion(c, name) == before


def register_versions(uri: str, name: str, n: int) -> list[str]:
    """``n`` versions of ``name`` from a tiny run artifact (no training needed)."""
    from pipeline.tracking import Tracker

    c = client(uri)
    experiment = c.get_experiment_by_name("cas")
    experiment_id = experiment.experiment_id if experiment else c.create_experiment("cas")
    out = []
    for i in range(n):
        run_ = c.create_run(experiment_id)
        c.log_text(run_.info.run_id, f"weights {i}", f"checkpoint/v{i}/model.txt")
        tracker = Tracker(c, run_.info.run_id, uri)
        out.append(tracker.register_model_version(name, f"checkpoint/v{i}"))
    return out


def test_promotion_is_a_compare_and_set(env, s3_bucket):
    """The alias moves only from the version compared against, and only under the lease."""
    from pipeline.lease import S3Lease
    from pipeline.retrain import promote_if_unchanged
    from pipeline.storage import resolve

    name = f"cas-{uuid.uuid4().hex[:8]}"
    v1, v2, v3 = register_versions(env, name, 3)
    c = client(env)
    lease_loc = resolve(f"{s3_bucket}/_locks/{name}.lock")
    lease = S3Lease(lease_loc, ttl=30)
    assert lease.acquire()
    # no alias yet and none expected: set
    assert promote_if_unchanged(c, name, "champion", v1, None, lease)[0] == "promoted"
    assert champion(c, name) == v1
    # compared against v2, but the alias is at v1: refused, alias unchanged
    status, reason = promote_if_unchanged(c, name, "champion", v3, v2, lease)
    assert status == "champion_moved" and f"from version {v2} to {v1}" in reason
    assert champion(c, name) == v1
    # compared against v1 and still v1: moved
    assert promote_if_unchanged(c, name, "champion", v2, v1, lease)[0] == "promoted"
    assert champion(c, name) == v2
    lease.release()

    # a lease that expired and was taken over cannot promote any more
    stale = S3Lease(lease_loc, ttl=0.3)
    assert stale.acquire()
    time.sleep(0.5)
    thief = S3Lease(lease_loc, ttl=30)
    assert thief.acquire()
    status, _ = promote_if_unchanged(c, name, "champion", v3, v2, stale)
    assert status == "lease_lost" and stale.lost
    assert champion(c, name) == v2
    thief.release()
