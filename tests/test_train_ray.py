"""Ray Train end to end: DDP exactness, exact resume, a killed worker, learning, MLflow, S3.

One local Ray for the module (4 logical CPUs on the 2-core machine). Tiny U-Nets at 8x8
fed by deterministic in-memory global batches check the arithmetic (DDP, resume, restart);
digits at 16x16 through the real Ray Data stream check learning, MLflow and S3.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from localray import local_ray
from tiny import TINY_UNET

from pipeline.checkpoint import load_checkpoint
from pipeline.config import build_config
from pipeline.train.data import InMemorySource, SourceContext

pytestmark = pytest.mark.slow

TOTAL = 44  # 5 full steps of 8 and a partial last step of 4 images


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """Local Ray for this module (tests/localray.py), after the S3 env is set."""
    with local_ray(num_cpus=4, by_value=sys.modules[__name__]):
        yield


def tiny_cfg(tmp_path: Path, name: str, **train) -> object:
    settings = {
        "run_name": name,
        "storage_path": str(tmp_path / "runs"),
        "total_images": TOTAL,
        "lr": 2e-3,
        "warmup_images": 16,
        "num_workers": 1,
        "cpus_per_worker": 1,
        "torch_threads": 1,
        "checkpoint_every_images": 16,
        "keep_checkpoints": 2,
        "log_every_steps": 1,
        "val_every_images": 10**6,
        "grid_every_images": 10**6,
        "ema_halflife_images": 16,
        "label_dropout": 0.25,
        "max_failures": 1,
    }
    settings.update(train)
    return build_config(
        {
            "seed": 0,
            "data": {"resolution": 8, "channels": 1, "batch_size": 8},
            "model": {**TINY_UNET, "num_classes": 3},
            "train": settings,
        }
    )


def in_memory() -> InMemorySource:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=gen) * 2 - 1
    return InMemorySource(x, torch.arange(32) % 3, seed=1)


def final_weights(result) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = load_checkpoint(result.checkpoint_uri)
    return {"model": ckpt.model, "ema": ckpt.ema}


def run(cfg, **kwargs):
    from pipeline.train.trainer import train

    lines: list[str] = []
    kwargs.setdefault("batch_source", in_memory())
    kwargs.setdefault("data_shape", (1, 8, 8))
    kwargs.setdefault("track", False)
    result = train(cfg, print_fn=lines.append, **kwargs)
    result.extra["lines"] = lines
    return result


def assert_same(a, b, atol=0.0, rtol=0.0):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], atol=atol, rtol=rtol,
                                       msg=lambda m, k=key, p=part: f"{p}.{k}: {m}")  # fmt: skip


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """One uninterrupted single-worker run to TOTAL images."""
    result = run(tiny_cfg(tmp_path_factory.mktemp("ref"), "ref"))
    assert result.images_seen == TOTAL
    return final_weights(result)


class KillOnce:
    """A batch source whose rank-0 worker SIGKILLs its own process once, mid-training.

    It waits a few seconds first: Ray Train's controller collects reports at its health
    checks (every 2 s), so a checkpoint reported just before a crash is not yet registered.
    """

    def __init__(self, inner, marker: str, after_batches: int) -> None:
        self.inner, self.marker, self.after = inner, marker, after_batches

    def batches(self, ctx: SourceContext):
        for i, batch in enumerate(self.inner.batches(ctx)):
            if ctx.rank == 0 and i == self.after and not os.path.exists(self.marker):
                Path(self.marker).write_text(f"{os.getpid()} killed at {ctx.images_seen}+{i}\n")
                time.sleep(2)
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no exception, no cleanup
            yield batch


# --------------------------------------------------------------------------- arithmetic
def test_ddp_two_workers_match_one_worker(reference, tmp_path):
    """2 gloo workers x 2 accumulated micro-batches of 2 == 1 worker x 1 batch of 8."""
    cfg = tiny_cfg(tmp_path, "ddp", num_workers=2, grad_accum=2)
    result = run(cfg)
    assert result.images_seen == TOTAL
    assert any("2 worker(s) x micro-batch 2" in line for line in result.extra["lines"])
    assert_same(final_weights(result), reference, atol=2e-5, rtol=1e-4)


def test_rerun_resumes_exactly_in_one_mlflow_run_and_refuses_another_network(
    reference, tmp_path, mlflow_server
):
    """Stop at 24 images (a checkpoint). A re-run with a changed model config is refused up
    front (one line naming the key, before any worker; the run's MLflow status stays
    FINISHED). Then two re-runs to TOTAL, each bit-exact with the uninterrupted reference:
    the run itself (same MLflow run, each step logged once) and a copy of it whose newest
    checkpoint is torn as a killed upload leaves it (it resumes from the newest COMPLETE
    one and says so)."""
    import shutil

    from mlflow import MlflowClient

    from pipeline.config import ConfigError

    uri = mlflow_server.uri

    def cfg_for(total: int, **model):
        cfg = tiny_cfg(tmp_path, "resume", total_images=total)
        cfg.tracking.uri, cfg.tracking.experiment = uri, "resume-test"
        for key, value in model.items():
            setattr(cfg.model, key, value)
        return cfg

    part = run(cfg_for(24), track=True)
    assert part.images_seen == 24 and part.mlflow_run_id
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(part.mlflow_run_id).info.status == "FINISHED"

    # another network cannot continue the run
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model\.base_channels=16 \(the run has 8\)"):
        run(cfg_for(24, base_channels=16), track=True)
    assert time.perf_counter() - started < 30  # refused up front, not by a worker
    assert client.get_run(part.mlflow_run_id).info.status == "FINISHED"

    # a copy of the stopped run with a torn newest checkpoint (untracked)
    shutil.copytree(tmp_path / "runs" / "resume", tmp_path / "runs" / "torn")
    torn = tmp_path / "runs" / "torn" / "checkpoint_000000000024" / "model.pt"
    torn.write_bytes(torn.read_bytes()[:100])  # what a killed upload leaves

    rest = run(cfg_for(TOTAL), track=True)
    assert rest.resumed_from == 24 and rest.images_seen == TOTAL
    assert rest.metrics["step"] == 6
    assert any("resuming at 24 images" in line for line in rest.extra["lines"])
    assert_same(final_weights(rest), reference)  # bit-exact: state, RNG and data restored

    experiment = client.get_experiment_by_name("resume-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [part.mlflow_run_id] == [rest.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(part.mlflow_run_id, "loss")
    assert sorted({m.step for m in history}) == [8, 16, 24, 32, 40, 44]

    from_torn = run(tiny_cfg(tmp_path, "torn"))
    lines = from_torn.extra["lines"]
    assert any("found checkpoint_000000000016 (16 images)" in line for line in lines), lines
    assert any("resuming at 16 images" in line for line in lines), lines
    assert from_torn.resumed_from == 16 and from_torn.images_seen == TOTAL
    assert_same(final_weights(from_torn), reference)  # weights, optimizer and data from one place


def test_killed_worker_is_restarted_and_finishes_the_run(reference, tmp_path, mlflow_server):
    """SIGKILL of the worker process after the first checkpoint; FailureConfig restarts it.
    The steps redone after the restart are not logged to MLflow a second time."""
    from mlflow import MlflowClient

    marker = tmp_path / "killed"
    source = KillOnce(in_memory(), str(marker), after_batches=3)  # during step 4 of 6
    cfg = tiny_cfg(tmp_path, "killed", max_failures=1)
    cfg.tracking.uri, cfg.tracking.experiment = mlflow_server.uri, "killed-test"
    cfg.train.retry_backoff_s = 0.5
    result = run(cfg, batch_source=source, track=True)
    assert marker.exists(), "the worker was never killed"
    retries = [line for line in result.extra["lines"] if "restarting from" in line]
    assert len(retries) == 1, result.extra["lines"]  # the transient failure, reported once
    assert retries[0].startswith("[train] worker 0 failed: ") and retries[0].endswith(
        "restarting from the last checkpoint in 0.5 s (attempt 2 of 2)"
    ), retries
    assert any("resuming at 16 images" in line for line in result.extra["lines"]), result.extra[
        "lines"
    ]
    assert result.images_seen == TOTAL and result.metrics["step"] == 6
    assert_same(final_weights(result), reference)  # restart from the checkpoint is exact
    history = MlflowClient(mlflow_server.uri).get_metric_history(result.mlflow_run_id, "loss")
    steps = [m.step for m in history]
    assert sorted(steps) == [8, 16, 24, 32, 40, 44], steps  # each step once, none twice


def first_experiment(client, name: str) -> str:
    return client.get_experiment_by_name(name).experiment_id


# --------------------------------------------------------------------------- digits, S3, MLflow
def test_digits_learn_on_s3_with_mlflow_and_resume(ray_local, s3_bucket, mlflow_server, tmp_path):
    """Digits 16x16 through the Ray Data stream, data and checkpoints in SeaweedFS, MLflow on
    a real server: the model learns, everything is logged, and a re-run resumes from S3."""
    from mlflow import MlflowClient

    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.stream import open_dataset
    from pipeline.models import build_model
    from pipeline.train.data import load_val_set
    from pipeline.train.validate import constant_predictor_loss, validation_loss

    data_uri = f"{s3_bucket}/digits"
    prep = build_config({"prepare": {"source": "digits", "out": data_uri, "resolution": 16}})
    prepare_dataset(prep, log=None)

    def cfg_for(total: int):
        return build_config(
            {
                "seed": 0,
                "data": {"uri": data_uri, "resolution": 16, "batch_size": 128},
                "model": {
                    **TINY_UNET,
                    "base_channels": 16,
                    "attention_resolutions": [8],
                    "num_heads": 4,
                    "num_classes": 10,
                },
                "train": {
                    "run_name": "digits-s3",
                    "storage_path": f"{s3_bucket}/runs",
                    "total_images": total,
                    "lr": 2e-3,
                    "warmup_images": 1024,
                    "ema_halflife_images": 1000,
                    "ema_warmup_ratio": 0.1,
                    "num_workers": 1,
                    "cpus_per_worker": 1,
                    "checkpoint_every_images": 1024,
                    "keep_checkpoints": 2,
                    "log_every_steps": 2,
                    "val_every_images": 1024,
                    "grid_every_images": 2048,
                    "grid_steps": 8,
                    "registered_model_name": "digits-test",
                },
                "tracking": {"uri": mlflow_server.uri, "experiment": "train-test"},
            }
        )

    first = run(cfg_for(2048), batch_source=None, data_shape=None, track=True)
    assert first.images_seen == 2048 and first.checkpoint_uri.startswith(f"{s3_bucket}/runs/")
    second = run(cfg_for(4096), batch_source=None, data_shape=None, track=True)
    assert second.resumed_from == 2048 and second.images_seen == 4096
    assert second.mlflow_run_id == first.mlflow_run_id
    assert any("found checkpoint_000000002048" in line for line in second.extra["lines"])

    # learning: clearly below the untrained network and the best constant predictor
    cfg = cfg_for(4096)
    info = open_dataset(cfg, "train")
    val = load_val_set(cfg, open_dataset(cfg, "val"), cfg.train.val_max_images)
    untrained = validation_loss(build_model(cfg.model, (1, 16, 16)), val)
    constant = constant_predictor_loss(val)
    final = second.metrics["val_loss"]
    assert final < 0.6 * untrained and final < 0.8 * constant, (final, untrained, constant)

    # MLflow, read back from the server
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("train-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == first.mlflow_run_id
    data = runs[0].data
    assert runs[0].info.status == "FINISHED"
    assert data.params["train.lr"] == "0.002" and data.params["model.base_channels"] == "16"
    assert data.tags["fmpipe.manifest_hash"] == info.manifest.content_hash()
    assert {"fmpipe.git_commit", "fmpipe.torch_version", "fmpipe.ray_version"} <= set(data.tags)
    losses = client.get_metric_history(first.mlflow_run_id, "loss")
    assert len(losses) == 16 and max(m.step for m in losses) == 4096
    for name in ("lr", "grad_norm", "images_per_sec", "data_wait_fraction"):
        assert client.get_metric_history(first.mlflow_run_id, name), name
    vals = client.get_metric_history(first.mlflow_run_id, "val_loss")
    assert [m.step for m in vals] == [1024, 2048, 3072, 4096]
    grids = [a.path for a in client.list_artifacts(first.mlflow_run_id, "grids")]
    assert grids == ["grids/images_000000002048.png", "grids/images_000000004096.png"]
    ckpt = {
        a.path for a in client.list_artifacts(first.mlflow_run_id, "checkpoint/images_000000004096")
    }
    assert {p.rsplit("/", 1)[1] for p in ckpt} == {"model.pt", "state.json", "config.yaml"}
    versions = client.search_model_versions("name = 'digits-test'")
    latest = max(versions, key=lambda v: int(v.version))
    assert latest.version == second.registered_version and len(versions) == 2
    assert latest.tags["manifest_hash"] == info.manifest.content_hash()
    assert latest.tags["images_seen"] == "4096"
    assert float(latest.tags["val_loss"]) == pytest.approx(final, rel=1e-4)

    # no secret anywhere it could leak
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    texts = [*data.params.values(), *data.tags.values(), *latest.tags.values()]
    texts += first.extra["lines"] + second.extra["lines"]
    assert secret and not any(secret in str(text) for text in texts)

    # checkpoints in S3: the last two kept, loadable for inference
    from pipeline.storage import resolve

    run_dir = resolve(f"{s3_bucket}/runs/digits-s3")
    import pyarrow.fs as pafs

    listing = run_dir.filesystem.get_file_info(pafs.FileSelector(run_dir.path))
    kept = sorted(i.base_name for i in listing if i.base_name.startswith("checkpoint_0"))
    assert kept == ["checkpoint_000000003072", "checkpoint_000000004096"]
