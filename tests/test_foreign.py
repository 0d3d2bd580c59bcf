"""Training on WebDataset shards fmpipe did not write (issue 14): ``data.uri`` names another
tool's shards (``webdataset.ShardWriter``), read through the dataset's index.

From a local folder and from SeaweedFS: the stream yields exactly the good samples (count and
label histogram), each bad one is counted with its reason, a short ``train()`` on them runs
to the end with the per-epoch bad-sample line on the console and in MLflow, and nothing is
written under the source. Config against the index: channels that disagree and a class count
that disagrees are one-line errors before any worker; a val split carved by seed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from foreign_data import MIXED_CLASSES, _dataset, _mixed_dataset, _samples, _write
from localray import local_ray
from tiny import TINY_UNET

from pipeline.config import ConfigError, build_config
from pipeline.data.stream import (
    ConfigMismatch,
    DatasetError,
    check_config_against_manifest,
    open_dataset,
)
from pipeline.storage import boto3_client

# _dataset: 24 good samples in 3 shards (labels 0/1/2, 8 each), 3 bad ones in the last
GOOD, BAD = 24, 3


@pytest.fixture(scope="module", autouse=True)
def ray_local(s3_server):
    """Local Ray for this module (tests/localray.py), after the S3 env is set."""
    with local_ray():
        yield


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cfg(uri: str, tmp_path: Path, **train):
    # fmt: off
    return build_config(
        {
            "seed": 0,
            "data": {"uri": uri, "resolution": 8, "channels": 3, "batch_size": 8,
                     "max_bad_fraction": 0.2},
            "model": {**TINY_UNET, "num_classes": 3},
            "train": {
                "run_name": "foreign", "storage_path": str(tmp_path / "runs"),
                "total_images": 32, "warmup_images": 8, "num_workers": 1,
                "cpus_per_worker": 1, "torch_threads": 1, "checkpoint_every_images": 10**6,
                "log_every_steps": 1, "val_every_images": 10**6, "grid_every_images": 10**6,
                "max_failures": 0, **train,
            },
        }
    )
    # fmt: on


def _stream_labels(cfg) -> Counter:
    from pipeline.train.data import build_train_stream

    info = open_dataset(cfg, "train")
    rows = build_train_stream(cfg, info, 0, 1, keys=True).take_all()
    return Counter(int(row["label"]) for row in rows)


def _s3_listing(bucket: str) -> list[tuple[str, str]]:
    page = boto3_client().list_objects_v2(Bucket=bucket.removeprefix("s3://"))
    return sorted((o["Key"], o["ETag"]) for o in page.get("Contents", []))


def test_the_stream_yields_exactly_the_good_samples_locally_and_from_s3(tmp_path, s3_bucket):
    local = tmp_path / "shards"
    _dataset(local)
    bucket = s3_bucket.removeprefix("s3://")
    for path in sorted(local.glob("*.tar")):
        boto3_client().upload_file(str(path), bucket, f"shards/{path.name}")
    before_local = sorted(p.name for p in local.iterdir())
    before_s3 = _s3_listing(s3_bucket)
    for uri in (str(local), f"{s3_bucket}/shards"):
        cfg = _cfg(uri, tmp_path)
        info = open_dataset(cfg, "train")
        assert info.foreign and info.manifest.num_classes == 3 and info.manifest.channels == 3
        assert info.usable_samples == GOOD and info.num_samples == GOOD + BAD
        assert _stream_labels(cfg) == {0: 8, 1: 8, 2: 8}, uri  # the good ones, each once
    assert sorted(p.name for p in local.iterdir()) == before_local  # nothing written there
    assert _s3_listing(s3_bucket) == before_s3


def test_a_short_run_on_foreign_shards_reports_its_bad_samples(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    from pipeline.train.trainer import train

    _dataset(tmp_path / "shards")
    # Four epochs of 27 samples: epoch 0's shards report asynchronously, and epoch 0 must
    # be reported before the run ends however late its last record lands.
    cfg = _cfg(str(tmp_path / "shards"), tmp_path, total_images=112)
    cfg.tracking.uri, cfg.tracking.experiment = mlflow_server.uri, "foreign-test"
    lines: list[str] = []
    result = train(cfg, print_fn=lines.append)
    assert result.images_seen == 112
    report = [line for line in lines if line.startswith("[data] epoch 0:")]
    assert report, lines
    final = next(i for i, line in enumerate(lines) if "checkpoint (final)" in line)
    assert lines.index(report[0]) < final, lines  # printed as the epoch ended, not at the end
    assert f"{BAD} of {GOOD + BAD} samples skipped as bad" in report[0], report
    for reason in ("missing image", "undecodable", "bad label"):
        assert reason in report[0], report
    client = MlflowClient(mlflow_server.uri)
    history = client.get_metric_history(result.mlflow_run_id, "data/bad_samples")
    assert [(m.step, m.value) for m in history][:1] == [(0, BAD)]
    path = client.download_artifacts(result.mlflow_run_id, "data/bad_samples.json", str(tmp_path))
    records = json.loads(Path(path).read_text())
    keys = {r["key"] for r in records if r["epoch"] == 0}
    assert {"a.b/c/000900", "a.b/c/000901", "a.b/c/000902"} <= keys
    # the dataset's class names travel with the model, so its samples can carry them
    from pipeline.checkpoint import read_state
    from pipeline.sample.sampler import SamplerSettings

    assert read_state(Path(result.checkpoint_uri)).class_names == ["0", "1", "2"]
    named = SamplerSettings(
        seed=0, solver="euler", steps=2, atol=1e-5, rtol=1e-5, guidance_scale=1.0, label=None,
        num_classes=2, data_shape=(3, 8, 8), block_size=4, class_names=("cat", "dog"),
    )  # fmt: skip
    assert named.sample_meta(7, 1)["class_name"] == "dog"
    assert "class_name" not in named.sample_meta(7, None)


def test_config_that_disagrees_with_the_index_fails_before_any_worker(tmp_path, caplog):
    from pipeline.train.trainer import train

    _dataset(tmp_path / "shards")
    grey = _cfg(str(tmp_path / "shards"), tmp_path)
    grey.data.channels = 1
    with pytest.raises(ConfigMismatch, match=r"data\.channels=1 but dataset .* is colour"):
        check_config_against_manifest(grey, open_dataset(grey, "train"))
    upsampled = _cfg(str(tmp_path / "shards"), tmp_path)
    upsampled.data.resolution = 16  # the images are at most 12 px
    with caplog.at_level("WARNING", logger="pipeline.data.stream"):
        check_config_against_manifest(upsampled, open_dataset(upsampled, "train"))
    assert any("largest image" in r.getMessage() and "12 px" in r.getMessage()
               for r in caplog.records), caplog.records  # fmt: skip
    classes = _cfg(str(tmp_path / "shards"), tmp_path)
    classes.model.num_classes = 5
    with pytest.raises(ConfigError, match=r"model\.num_classes=5 but dataset .* has 3 classes"):
        train(classes, print_fn=None, track=False)


def test_channels_left_unset_come_from_the_index(tmp_path):
    """Colour foreign images: an unset data.channels becomes 3; the images' sizes vary,
    so data.resolution keeps its value and a note names the range and the key."""
    from pipeline.data.stream import adopt_dataset_shape

    _dataset(tmp_path / "shards")
    cfg = _cfg(str(tmp_path / "shards"), tmp_path)
    unset = build_config({"seed": 0, "data": {"uri": cfg.data.uri}})
    notes = adopt_dataset_shape(unset, open_dataset(unset, "train"))
    assert unset.data.channels == 3 and unset.data.resolution == 16
    assert notes[0] == "data.channels=3 (the dataset's)"
    assert "data.resolution=16 (the default: images range from 8x8 to 12x10 px" in notes[1]
    assert "set data.resolution" in notes[1], notes
    assert adopt_dataset_shape(cfg, open_dataset(cfg, "train")) == []  # set: left alone


def test_classes_left_unset_come_from_the_index_and_unlabelled_shards_train_unconditional(
    tmp_path,
):
    """`fmpipe train`'s own defaults (train.yaml) on another tool's shards: labelled ones
    make a class-conditional model of the index's classes, the same shards read without
    labels an unconditional one, and a number the user sets is kept and checked."""
    from jobs._common import packaged_defaults
    from pipeline.config import load_config
    from pipeline.data.stream import adopt_dataset_shape

    _dataset(tmp_path / "shards")
    uri = str(tmp_path / "shards")

    def job_cfg(*overrides: str):
        return load_config(None, [f"data.uri={uri}", *overrides], packaged_defaults("train"))

    labelled = job_cfg()
    notes = adopt_dataset_shape(labelled, open_dataset(labelled, "train"))
    assert (
        labelled.model.num_classes == 3 and "model.num_classes=3 (the dataset's classes)" in notes
    )
    unlabelled = job_cfg("data.label_source=none")
    notes = adopt_dataset_shape(unlabelled, open_dataset(unlabelled, "train"))
    assert unlabelled.model.num_classes == 0 and not any("num_classes" in n for n in notes)
    assert open_dataset(unlabelled, "train").manifest.num_classes == 0
    given = job_cfg("model.num_classes=5")
    notes = adopt_dataset_shape(given, open_dataset(given, "train"))
    assert not any("num_classes" in n for n in notes), notes
    assert given.model.num_classes == 5  # kept: train() then refuses it (test above)


def test_a_val_split_carved_by_seed_and_a_missing_one_named(tmp_path):
    folder = tmp_path / "many"
    _write(folder, _samples(0, 40), maxcount=4)  # 10 shards
    cfg = _cfg(str(folder), tmp_path)
    with pytest.raises(DatasetError, match=r"no 'val' split: give one with data\.val_uri"):
        open_dataset(cfg, "val")
    cfg.data.val_fraction = 0.3
    train_split, val_split = open_dataset(cfg, "train"), open_dataset(cfg, "val")
    names = {s.name for s in train_split.shards}
    assert val_split.shards and not names & {s.name for s in val_split.shards}
    assert len(names) + len(val_split.shards) == 10
    again = open_dataset(cfg, "val")
    assert [s.name for s in again.shards] == [s.name for s in val_split.shards]  # by seed


@pytest.mark.slow
def test_retrain_sees_new_shards_of_a_growing_foreign_dataset(tmp_path, mlflow_server, monkeypatch):
    """A bucket that grows: retrain trains and promotes a first model, does nothing while
    the shards stay the same, and once a shard is added the index reads only that one, the
    content hash changes and retrain trains a candidate on it."""
    from pipeline.data.foreign import refresh_index
    from pipeline.retrain import retrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    train_dir, val_dir = tmp_path / "shards", tmp_path / "val"
    _write(train_dir, _samples(0, 32), maxcount=16)
    _write(val_dir, _samples(100, 16), maxcount=16)

    def cfg():
        c = _cfg(str(train_dir), tmp_path, registered_model_name="grows", val_max_images=16)
        c.data.val_uri = str(val_dir)
        c.tracking.experiment = "foreign-retrain"
        c.retrain.images, c.retrain.promote_margin = 32, 0.0
        return c

    first = retrain(cfg(), print_fn=None)
    assert first.outcome == "promoted"
    hash_1 = refresh_index(cfg()).index.content_hash
    assert retrain(cfg(), print_fn=None).outcome == "no_new_data"

    _write(train_dir, _samples(32, 8), maxcount=16, name="more")
    grown = refresh_index(cfg())
    assert (grown.read, grown.reused) == (1, 3)  # only the new shard is read
    assert grown.index.content_hash != hash_1
    third = retrain(cfg(), print_fn=None)
    assert third.outcome in ("promoted", "rejected") and third.candidate_version == "2"


def test_too_many_bad_samples_is_final_and_names_count_limit_and_keys(tmp_path):
    """Over data.max_bad_fraction: the run ends once (not retried by FailureConfig) with
    the count, the fraction, the limit and a bad key, whole, on the driver."""
    from pipeline.data.stream import TooManyBadSamples
    from pipeline.train.trainer import train

    _dataset(tmp_path / "shards")
    cfg = _cfg(str(tmp_path / "shards"), tmp_path, max_failures=2)
    cfg.data.max_bad_fraction = 0.01
    lines: list[str] = []
    with pytest.raises(TooManyBadSamples) as info:
        train(cfg, print_fn=lines.append, track=False)
    message = str(info.value)
    assert "data.max_bad_fraction=0.01" in message and "skipped as bad" in message, message
    assert "tail-000000.tar" in message and "e.g. key a.b/c/0009" in message, message
    assert not [line for line in lines if "restarting from" in line], lines  # never retried


def test_images_of_every_format_mode_and_shape_train_with_named_labels(tmp_path):
    """webp, bmp, tiff (CMYK), gif (P), png (LA, RGBA, I;16), ppm and grey jpeg, 1 px wide
    and 150:1, labelled by class name: every good one is streamed (aspect ratio and width
    are no reason to drop), names become ids in sorted order, the three bad ones are
    counted, and a short run trains on them."""
    from pipeline.train.trainer import train

    good, names = _mixed_dataset(tmp_path / "mixed")
    cfg = _cfg(str(tmp_path / "mixed"), tmp_path, total_images=16)
    cfg.model.num_classes = 2
    info = open_dataset(cfg, "train")
    assert info.manifest.class_names == sorted(MIXED_CLASSES)
    assert info.usable_samples == good and info.num_samples == good + 3
    by_id = {i: n for i, n in enumerate(sorted(MIXED_CLASSES))}
    assert {by_id[k]: v for k, v in _stream_labels(cfg).items()} == names
    lines: list[str] = []
    result = train(cfg, print_fn=lines.append, track=False)
    assert result.images_seen == 16
    assert any(f"3 of {good + 3} samples skipped" in line for line in lines), lines


def test_the_shards_common_folder_is_the_split_location():
    from pipeline.data.foreign import _common_folder

    assert _common_folder(["s3://b/x/a.tar", "s3://b/y/b.tar"]) == "s3://b"
    assert _common_folder(["s3://b/x/a.tar", "s3://b/x/b.tar"]) == "s3://b/x"
    assert _common_folder(["/d/x/a.tar", "/d/x/y/b.tar"]) == "/d/x"
    assert _common_folder(["s3://a/x.tar", "s3://b/y.tar"]).rstrip("/:") == "s3"  # refused
