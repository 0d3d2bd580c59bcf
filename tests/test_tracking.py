"""pipeline.tracking against a real ``mlflow server`` (sqlite + SeaweedFS artifacts), the
embedded sqlite default, and pipeline.viz."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import build_config
from pipeline.redact import scrub
from pipeline.tracking import Tracker, find_run_id, tracking_uri
from pipeline.viz import image_grid, loss_curve_png, save_png, to_uint8

SECRET = "sEcReT-Value-1234567890-do-not-log"


def _uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def server_cfg(mlflow_server, monkeypatch, tmp_path):
    """A config pointing at the real server; FMPIPE_HOME (download cache) under tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    return build_config(overrides=[f"tracking.uri={mlflow_server.uri}", "train.lr=0.001"])


def _client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(cfg), registry_uri=tracking_uri(cfg))


def _artifact_text(cfg, run_id: str, path: str) -> str:
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, tracking_uri=tracking_uri(cfg)
    )
    return Path(local).read_text()


# --------------------------------------------------------------------------- where MLflow is


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config()
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert (tmp_path / "h").is_dir()
    cfg = build_config(overrides=["tracking.uri=http://cfg:5000"])
    assert tracking_uri(cfg) == "http://cfg:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri(cfg) == "http://env:5000"


def test_embedded_sqlite_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config(overrides=["model.kind=mlp"])
    with Tracker.start(cfg, experiment="embedded", run_name="r") as tracker:
        tracker.log_config(cfg)
        tracker.log_metrics({"loss": 1.5}, step=1)
        tracker.log_image(np.zeros((4, 6), np.uint8), "grids/step_000001.png")
    run = _client(cfg).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.kind"] == "mlp"
    assert (tmp_path / "home" / "mlflow.db").is_file()
    artifacts = tmp_path / "home" / "mlartifacts" / "embedded" / tracker.run_id / "artifacts"
    assert (artifacts / "config.yaml").is_file()
    assert Image.open(artifacts / "grids" / "step_000001.png").size == (6, 4)


# --------------------------------------------------------------------------- the real server


def test_params_metrics_image_and_text(server_cfg):
    cfg = server_cfg
    tracker = Tracker.start(cfg, experiment=f"exp-{_uid()}", run_name="basic", tags={"k": "v"})
    tracker.log_config(cfg)
    for step in (10, 20, 30):
        tracker.log_metrics({"train/loss": 1.0 / step, "lr": torch.tensor(0.5)}, step=step)
    grid = image_grid(torch.zeros(6, 3, 8, 8), nrow=3, pad=1)
    tracker.log_image(grid, "grids/step_000030.png")
    tracker.log_text("hello", "notes/hello.txt")
    tracker.end()

    client = _client(cfg)
    run = client.get_run(tracker.run_id)
    flat = cfg.flat()
    assert set(run.data.params) == set(flat)
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["model.channel_mult"] == "[1, 2, 2]"
    assert run.data.tags["k"] == "v"
    assert run.data.tags["fmpipe.git_commit"]
    assert run.data.tags["fmpipe.mlflow_version"].startswith("3.")
    assert run.data.tags["fmpipe.torch_version"].startswith(torch.__version__.split("+")[0])
    assert run.info.status == "FINISHED"

    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in history] == [10, 20, 30]
    assert [m.value for m in history] == pytest.approx([0.1, 0.05, 1 / 30])
    assert client.get_metric_history(tracker.run_id, "lr")[0].value == 0.5

    assert [f.path for f in client.list_artifacts(tracker.run_id, "grids")] == [
        "grids/step_000030.png"
    ]
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        run_id=tracker.run_id, artifact_path="grids/step_000030.png", tracking_uri=cfg.tracking.uri
    )
    png = Path(local).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    assert img.size == (1 + 3 * 9, 1 + 2 * 9) and img.mode == "RGB"
    yaml_text = _artifact_text(cfg, tracker.run_id, "config.yaml")
    assert "lr: 0.001" in yaml_text


def test_resume_continues_the_same_run(server_cfg):
    cfg = server_cfg
    experiment = f"resume-{_uid()}"
    first = Tracker.start(cfg, experiment=experiment, run_name="job")
    first.log_config(cfg)
    first.log_metrics({"loss": 2.0}, step=1)
    first.end("FAILED")  # the job died

    assert find_run_id(cfg, experiment=experiment, run_name="job") == first.run_id
    again = Tracker.start(cfg, experiment=experiment, run_name="job", run_id=first.run_id)
    assert again.run_id == first.run_id
    assert again.log_config(cfg) == {}  # identical params: skipped, no MLflow error
    changed = build_config(overrides=[f"tracking.uri={cfg.tracking.uri}", "train.lr=0.002"])
    assert again.log_config(changed) == {"train.lr": ("0.001", "0.002")}
    again.log_metrics({"loss": 1.0}, step=2)
    client = _client(cfg)
    assert client.get_run(again.run_id).info.status == "RUNNING"
    again.end()

    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]
    with pytest.raises(ValueError, match="cannot resume MLflow run 'nope"):
        Tracker.start(cfg, experiment=experiment, run_name="job", run_id="nope0000")


def test_no_secrets_reach_mlflow(server_cfg, monkeypatch):
    cfg = build_config(
        overrides=[f"tracking.uri={server_cfg.tracking.uri}", f"train.run_name=x-{SECRET}"]
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-abcdef-987654")
    assert SECRET not in scrub(f"key={SECRET}") and "***" in scrub(f"key={SECRET}")
    assert scrub("http://user:pw1234@host/x") == "http://user:***@host/x"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a credential
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/tmp/token-file-path")
    assert scrub("hflip: false /tmp/token-file-path") == "hflip: false /tmp/token-file-path"

    tracker = Tracker.start(cfg, experiment=f"sec-{_uid()}", run_name="s", tags={"t": SECRET})
    tracker.log_config(cfg)
    tracker.set_tags({"note": f"endpoint with {SECRET} and tok-abcdef-987654"})
    tracker.log_text(f"env: {SECRET}", "notes/env.txt")
    for key in ("storage.secret_key", "aws_access_key_id", "db.password", "x.token"):
        with pytest.raises(ValueError, match="looks like a credential"):
            tracker.log_params({key: "v"})
    with pytest.raises(ValueError, match="looks like a credential"):
        tracker.set_tags({"storage.secret_key": "v"})
    tracker.log_params({"data.max_tokens": 3, "train.grad_accum": 1})  # not credentials
    tracker.end()

    run = _client(cfg).get_run(tracker.run_id)
    dumped = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in dumped and "tok-abcdef-987654" not in dumped
    assert run.data.params["train.run_name"] == "x-***"
    for artifact in ("config.yaml", "notes/env.txt"):
        text = _artifact_text(cfg, tracker.run_id, artifact)
        assert SECRET not in text and "***" in text


def test_disabled_tracker_is_a_no_op():
    tracker = Tracker.disabled()
    cfg = build_config(overrides=["tracking.uri=http://127.0.0.1:9"])  # nothing listens
    assert not tracker.enabled and tracker.run_id is None
    tracker.log_config(cfg)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_image(np.zeros((2, 2), np.uint8), "x.png")
    tracker.log_text("x", "x.txt")
    assert tracker.register_model_version("m", "p", {}) == ""
    tracker.set_alias("m", "champion", "1")
    tracker.end()
    started = Tracker.start(cfg, experiment="e", run_name="r", enabled=False)
    assert not started.enabled


# --------------------------------------------------------------------------- viz


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6)
    u = to_uint8(x)
    assert u.shape == (1, 1, 6, 1) and u.dtype == np.uint8
    assert u.ravel().tolist() == [0, 0, 128, 255, 255, 255]
    rgb = to_uint8(torch.zeros(2, 3, 4, 5))
    assert rgb.shape == (2, 4, 5, 3)


def test_image_grid_shapes_and_placement():
    n, h, w = 5, 3, 4
    imgs = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        imgs[i] = (i + 1) * 40
    grid = image_grid(imgs, nrow=2, pad=1, pad_value=7)
    arr = np.asarray(grid)
    assert grid.mode == "RGB"
    assert arr.shape == (1 + 3 * (h + 1), 1 + 2 * (w + 1), 3)
    for i in range(n):
        y, x = 1 + (i // 2) * (h + 1), 1 + (i % 2) * (w + 1)
        assert (arr[y : y + h, x : x + w] == (i + 1) * 40).all()
    assert (arr[0] == 7).all() and (arr[:, 0] == 7).all()
    assert (arr[1 + 2 * (h + 1) :, 1 + (w + 1) :] == 7).all()  # empty sixth cell

    gray = image_grid(torch.ones(3, 1, 2, 2), nrow=8, pad=0, scale=3)
    assert gray.mode == "L" and gray.size == (3 * 2 * 3, 2 * 3)
    assert (np.asarray(gray) == 255).all()
    one_row = image_grid(np.zeros((4, 2, 2), np.uint8), nrow=4)
    assert one_row.size == (2 + 4 * 4, 2 + 4)
    with pytest.raises(ValueError, match="uint8"):
        image_grid(np.zeros((2, 2, 2, 3), np.float32), nrow=2)


def test_save_png_and_loss_curve(tmp_path):
    path = save_png(np.full((5, 7, 3), 9, np.uint8), tmp_path / "a" / "img.png")
    assert Image.open(path).size == (7, 5)
    curve = loss_curve_png(
        list(range(50)), [1.0 / (s + 1) for s in range(50)], tmp_path / "c.png", "loss"
    )
    img = Image.open(curve)
    assert img.format == "PNG" and img.size == (600, 400)


def test_a_tolerant_tracker_keeps_metrics_through_a_real_outage_and_sends_them_late(
    tmp_path, monkeypatch, caplog
):
    """Training's tracker (`Tracker.tolerate_outages`) against an MLflow server of its own
    that is stopped (its whole process group) mid-run and started again on the same port
    and store: no call raises while it is down, no call waits longer than the short
    retries, every metric step reaches the run in the end (sent late, in order), a grid of
    the outage is skipped, and one warning marks each end of the outage. A request MLflow
    refuses (4xx: a run that does not exist) still raises."""
    import logging
    import time

    from mlflow.exceptions import MlflowException

    from pipeline.stack.servers import MLflowServer

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)  # tolerate_outages sets them; undone after
    server = MLflowServer(tmp_path / "mlflow.db", str(tmp_path / "artifacts"))
    server.start(timeout=180)
    try:
        from mlflow import MlflowClient

        client = MlflowClient(server.uri)
        experiment = client.create_experiment("outage")
        run_id = client.create_run(experiment).info.run_id
        tracker = Tracker.attach(server.uri, run_id).tolerate_outages(retry_every_s=3.0)
        for step in range(5):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        port = server.port
        server.stop()
        caplog.set_level(logging.WARNING, logger="pipeline.tracking")
        slowest = 0.0
        for step in range(5, 10):
            began = time.monotonic()
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            tracker.log_image(np.zeros((4, 4), dtype=np.uint8), "grids/outage.png")
            slowest = max(slowest, time.monotonic() - began)
        assert slowest < 30, slowest  # MLflow's own defaults: minutes per call
        assert sum("cannot be reached" in r.getMessage() for r in caplog.records) == 1

        server = MLflowServer(tmp_path / "mlflow.db", str(tmp_path / "artifacts"), port=port)
        server.start(timeout=180)
        time.sleep(3.0)  # past the tracker's retry interval
        for step in range(10, 12):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        back = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(back) == 1 and "metric(s) sent late" in back[0], back
        history = sorted(MlflowClient(server.uri).get_metric_history(run_id, "loss"),
                         key=lambda m: m.step)  # fmt: skip
        assert [m.step for m in history] == list(range(12))  # none lost
        assert [m.value for m in history] == pytest.approx([1.0 / (s + 1) for s in range(12)])
        assert "grids/outage.png" not in [
            a.path for a in MlflowClient(server.uri).list_artifacts(run_id, "grids")
        ]
        with pytest.raises(MlflowException):
            Tracker.attach(server.uri, "0" * 32).tolerate_outages().log_metrics({"x": 1}, 0)
    finally:
        server.stop()


def test_a_tracking_server_that_does_not_answer_fails_at_once_in_one_line(
    server_cfg, monkeypatch, tmp_path
):
    """MLflow's client would retry a refused connection for ~4 minutes (a console warning
    per try); a job's driver asks once: one error naming the server and the reason, in
    seconds. A live server and a sqlite store pass; a registry lookup is checked too."""
    import socket
    import time

    from pipeline.registry import registry_client
    from pipeline.tracking import TrackingUnreachable, check_reachable

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config(overrides=[f"tracking.uri={dead}"])
    began = time.monotonic()
    with pytest.raises(TrackingUnreachable) as info:
        Tracker.start(cfg, experiment="e", run_name="r")
    assert time.monotonic() - began < 30
    assert str(info.value).startswith(f"MLflow tracking server {dead} cannot be reached")
    assert "connection refused" in str(info.value) and "tracking.uri" in str(info.value)
    with pytest.raises(TrackingUnreachable, match="unknown host"):
        registry_client("http://fmpipe-no-such-host.invalid:5000")
    check_reachable(server_cfg.tracking.uri)  # the live server answers
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # nothing to reach
    Tracker.start(server_cfg, experiment="reachable", run_name="r").end()
