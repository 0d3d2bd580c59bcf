"""`make demo`'s main job on a reduced budget: grid PNG, sample shards and MLflow runs."""

from __future__ import annotations

import pytest
from localray import TRAIN_POLL_S

pytestmark = pytest.mark.slow


def test_demo_end_to_end_on_embedded_defaults(tmp_path, monkeypatch, capsys):
    import ray
    import webdataset as wds
    from mlflow import MlflowClient

    from jobs import demo
    from pipeline.data.manifest import Manifest

    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
    overrides = [
        "train.total_images=1024",
        "train.warmup_images=256",
        "train.checkpoint_every_images=1024",
        "train.val_every_images=1024",
        "train.grid_every_images=1024",
        "train.grid_steps=4",
        "model.base_channels=16",
        "sample.num_samples=60",
        "sample.shard_size=25",
        "sample.steps=4",
    ]
    try:
        assert demo.main(overrides) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    home = tmp_path / "home"

    grids = list((home / "samples").glob("*/grid.png"))
    assert len(grids) == 1 and grids[0].read_bytes()[:4] == b"\x89PNG"
    assert str(grids[0]) in out and "mlflow ui --backend-store-uri" in out
    assert "[sample] 3 / 3 shards  60 / 60 samples (100.0%)" in out  # the sample step's progress

    samples = home / "store" / "samples" / "digits"
    manifest = Manifest.from_json((samples / "_manifest.json").read_text())
    assert manifest.num_samples == 60 and len(manifest.shards) == 3
    keys = [
        s["__key__"]
        for s in wds.WebDataset(
            [str(samples / shard.name) for shard in manifest.shards], shardshuffle=False
        )
    ]
    assert keys == [f"{i:010d}" for i in range(60)]

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("digits", "champion")
    assert str(champion.version) == "1"
    train_runs = client.search_runs([client.get_experiment_by_name("fmpipe").experiment_id])
    sample_runs = client.search_runs(
        [client.get_experiment_by_name("fmpipe-samples").experiment_id]
    )
    assert len(train_runs) == 1 and len(sample_runs) == 1
    assert sample_runs[0].data.tags["fmpipe.train_run_id"] == train_runs[0].info.run_id
    assert "grid.png" in [a.path for a in client.list_artifacts(sample_runs[0].info.run_id)]

    # [4/4]: the samples' quality beside real held-out digits, by the registered classifier.
    assert "quality      (classifier:" in out and "against 1,617 training digits" in out, out
    real = next(line for line in out.splitlines() if "real held-out (180)" in line)
    assert float(real.split()[-2]) > 0.95, real  # the classifier's held-out accuracy
    assert str(client.get_model_version_by_alias("digits-classifier", "champion").version) == "1"
    eval_runs = client.search_runs([client.get_experiment_by_name("fmpipe-eval").experiment_id])
    assert len(eval_runs) == 3  # the classifier, the samples, the real held-out digits
