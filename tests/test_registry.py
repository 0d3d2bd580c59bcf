"""pipeline.registry against a real ``mlflow server`` (sqlite + SeaweedFS artifacts) and the
embedded sqlite default: lookups, model URIs -> local checkpoints, and one-line errors."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from pipeline.config import Config, build_config
from pipeline.registry import (
    ModelNotFound,
    alias_version,
    describe_model,
    find_version,
    model_versions,
    read_champion,
    registered_model,
    registry_client,
    resolve_model_uri,
)
from pipeline.tracking import Tracker


def _uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def server_cfg(mlflow_server, monkeypatch, tmp_path) -> Config:
    """A config pointing at the real server; FMPIPE_HOME (download cache) under tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    return build_config(overrides=[f"tracking.uri={mlflow_server.uri}", "train.lr=0.001"])


@pytest.fixture
def embedded_cfg(monkeypatch, tmp_path) -> Config:
    """The embedded default: MLflow on ``$FMPIPE_HOME/mlflow.db`` (sqlite), no server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    return build_config()


def _checkpoint_dir(root: Path, marker: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.pt").write_bytes(b"weights-" + marker.encode())
    (root / "config.yaml").write_text(f"marker: {marker}\n")
    return root


def _register(cfg: Config, tmp_path: Path, name: str, n: int, alias_to: str | None) -> str:
    """``n`` versions of ``name`` from one run (checkpoints/v1, ...); returns the run id."""
    tracker = Tracker.start(cfg, experiment=f"reg-{_uid()}", run_name="reg")
    for i in range(1, n + 1):
        path = f"checkpoints/v{i}"
        tracker.log_artifacts(_checkpoint_dir(tmp_path / f"c{i}", str(i)), path)
        assert tracker.register_model_version(name, path, {"manifest_hash": f"h{i}"}) == str(i)
    if alias_to:
        tracker.set_alias(name, "champion", alias_to)
    tracker.end()
    assert tracker.run_id
    return tracker.run_id


def test_register_alias_and_resolve(server_cfg, tmp_path):
    cfg = server_cfg
    name = f"digits-{_uid()}"
    tracker = Tracker.start(cfg, experiment=f"reg-{_uid()}", run_name="reg")
    tracker.log_artifacts(_checkpoint_dir(tmp_path / "c1", "one"), "checkpoints/a")
    tracker.log_artifacts(_checkpoint_dir(tmp_path / "c2", "two"), "checkpoints/b")
    v1 = tracker.register_model_version(name, "checkpoints/a", {"images": "100"})
    v2 = tracker.register_model_version(name, "checkpoints/b", {"images": "200"})
    assert (v1, v2) == ("1", "2")
    tracker.set_alias(name, "champion", v2)
    with pytest.raises(ValueError, match="no artifacts under 'checkpoints/missing'"):
        tracker.register_model_version(name, "checkpoints/missing", {})
    tracker.end()

    champ = resolve_model_uri(f"models:/{name}@champion", cfg)
    assert (champ.name, champ.version, champ.alias, champ.run_id) == (
        name,
        "2",
        "champion",
        tracker.run_id,
    )
    assert champ.tags["images"] == "200"
    assert (Path(champ.checkpoint_uri) / "model.pt").read_bytes() == b"weights-two"
    assert (Path(champ.checkpoint_uri) / "config.yaml").is_file()

    first = resolve_model_uri(f"models:/{name}/1", cfg)
    assert first.version == "1" and first.alias is None
    assert (Path(first.checkpoint_uri) / "model.pt").read_bytes() == b"weights-one"
    assert resolve_model_uri(f"models:/{name}/1", cfg).checkpoint_uri == first.checkpoint_uri

    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "keep.txt").write_text("mine")
    explicit = resolve_model_uri(f"models:/{name}/latest", cfg, dst_dir=tmp_path / "dl")
    assert explicit.version == "2" and Path(explicit.checkpoint_uri) == tmp_path / "dl"
    assert (tmp_path / "dl" / "model.pt").read_bytes() == b"weights-two"
    assert (tmp_path / "dl" / "keep.txt").read_text() == "mine"

    runs = resolve_model_uri(f"runs:/{tracker.run_id}/checkpoints/a", cfg)
    assert (Path(runs.checkpoint_uri) / "model.pt").read_bytes() == b"weights-one"

    plain = resolve_model_uri("s3://bucket/runs/x/checkpoint_000001", cfg)
    assert plain.checkpoint_uri == "s3://bucket/runs/x/checkpoint_000001"
    assert plain.name is None and plain.tags == {}

    with pytest.raises(ModelNotFound) as err:
        resolve_model_uri(f"models:/{name}@staging", cfg)
    msg = str(err.value)
    assert f"'{name}'" in msg and "alias 'staging'" in msg
    assert "champion -> version 2" in msg and "versions: 1, 2" in msg

    with pytest.raises(ModelNotFound) as err:
        resolve_model_uri(f"models:/{name}/7", cfg)
    msg = str(err.value)
    assert f"'{name}' has no version 7" in msg and "versions: 1, 2" in msg

    with pytest.raises(ModelNotFound) as err:
        resolve_model_uri("models:/no-such-model@champion", cfg)
    msg = str(err.value)
    assert "'no-such-model' does not exist" in msg and name in msg

    with pytest.raises(ValueError, match="is not models:/<name>@<alias>"):
        resolve_model_uri("models:/onlyname", cfg)


@pytest.mark.parametrize("where", ["server", "embedded"])
def test_missing_alias_or_version_is_one_line_naming_what_exists(
    where: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``models:/digits@champion`` without the alias, ``models:/digits/99``: ModelNotFound.

    The embedded sqlite store returns versions as ints, where joining them into the message
    raised ``TypeError: sequence item 0: expected str instance, int found``.
    """
    cfg = request.getfixturevalue(f"{where}_cfg")
    name = f"digits-{_uid()}"
    _register(cfg, tmp_path, name, 2, alias_to=None)

    with pytest.raises(ModelNotFound) as err:
        resolve_model_uri(f"models:/{name}@champion", cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert (
        msg == f"registered model '{name}' has no alias 'champion'; versions: 1, 2; aliases: none"
    )

    with Tracker.start(cfg, experiment=f"alias-{_uid()}", run_name="alias") as tracker:
        tracker.set_alias(name, "staging", 1)
    with pytest.raises(ModelNotFound) as err:
        resolve_model_uri(f"models:/{name}/99", cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        f"registered model '{name}' has no version 99; versions: 1, 2; "
        "aliases: staging -> version 1"
    )

    with pytest.raises(ModelNotFound) as err:
        resolve_model_uri(f"models:/{name}-gone/3", cfg)
    msg = str(err.value)
    assert "\n" not in msg and f"'{name}-gone' does not exist" in msg and name in msg

    with pytest.raises(ModelNotFound, match="MLflow run 'nosuchrun' does not exist"):
        resolve_model_uri("runs:/nosuchrun/checkpoints/v1", cfg)


@pytest.mark.parametrize("where", ["server", "embedded"])
def test_lookups_retrain_and_sample_share(
    where: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    cfg = request.getfixturevalue(f"{where}_cfg")
    client = registry_client(cfg)
    name = f"digits-{_uid()}"
    assert registered_model(client, name) is None
    assert alias_version(client, name, "champion") is None
    assert read_champion(client, name, "champion") is None

    run_id = _register(cfg, tmp_path, name, 3, alias_to="2")
    assert registered_model(client, name) is not None
    assert [str(mv.version) for mv in model_versions(client, name)] == ["1", "2", "3"]
    assert alias_version(client, name, "champion") == "2"
    assert alias_version(client, name, "staging") is None
    champion = read_champion(client, name, "champion")
    assert champion is not None
    assert (champion.version, champion.manifest_hash, champion.run_id) == ("2", "h2", run_id)
    assert find_version(client, name, run_id, "checkpoints/v3") == "3"
    assert find_version(client, name, run_id, "checkpoints/v9") is None
    assert find_version(client, name, "another-run", "checkpoints/v3") is None
    assert describe_model(client, name) == "versions: 1, 2, 3; aliases: champion -> version 2"
    assert describe_model(client, f"{name}-none") == "versions: none; aliases: none"

    # a config or a tracking URI, the same registry
    from pipeline.tracking import tracking_uri

    other = registry_client(tracking_uri(cfg))
    assert alias_version(other, name, "champion") == "2"


def test_sample_and_retrain_use_the_registry_module() -> None:
    """One implementation: retrain's lookups are pipeline.registry's, tracking has none."""
    import pipeline.registry as registry
    import pipeline.retrain as retrain
    import pipeline.tracking as tracking

    assert retrain.read_champion is registry.read_champion
    assert retrain.Champion is registry.Champion
    for gone in ("ModelNotFound", "ResolvedModel", "resolve_model_uri", "_lookup_version"):
        assert not hasattr(tracking, gone), gone
    assert not hasattr(registry.ResolvedModel, "from_registry")
