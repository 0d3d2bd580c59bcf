"""Tampered or mismatched data is a clear error; a corrupt shard fails once, fast, named.

Data: digits written by the real ``fmpipe prepare`` (8x8, or 16x16 for the resolution
case), locally or into SeaweedFS. Pre-worker checks run ``train(cfg)`` with Ray shut
down and assert it is still down afterwards: the error came before any Ray work. Stream
and Ray Train cases use one local Ray for the module (started after the S3 env is set).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest
from localray import local_ray
from tiny import TINY_UNET

from pipeline.config import ConfigError, build_config
from pipeline.data.manifest import MANIFEST_NAME, Manifest, bad_digest, shard_name
from pipeline.data.stream import (
    ConfigMismatch,
    DatasetError,
    ShardIntegrityError,
    TooManyBadSamples,
    check_config_against_manifest,
    final_data_error,
    open_dataset,
)
from pipeline.storage import resolve

RES = 8


# --------------------------------------------------------------------------- helpers
def prepare(uri: str, *, seed: int = 0, resolution: int = RES) -> str:
    """Digits written by the real prepare at ``resolution`` into ``uri``; returns ``uri``."""
    from pipeline.data.prepare import prepare_dataset

    cfg = build_config(
        {
            "seed": seed,
            "prepare": {"source": "digits", "out": uri, "resolution": resolution,
                        "shard_size": 400},
        }
    )  # fmt: skip
    prepare_dataset(cfg, log=None)
    return uri


def train_cfg(data_uri: str, tmp_path: Path, *overrides: str, resolution: int = RES):
    return build_config(
        {
            "seed": 0,
            "data": {"uri": data_uri, "resolution": resolution, "channels": 1,
                     "batch_size": 32},
            "model": {**TINY_UNET, "num_classes": 10},
            "train": {
                "run_name": "integrity",
                "storage_path": str(tmp_path / "runs"),
                "total_images": 64,
                "num_workers": 1,
                "cpus_per_worker": 1,
                "torch_threads": 1,
                "checkpoint_every_images": 10**6,
                "val_every_images": 10**6,
                "grid_every_images": 10**6,
                "max_failures": 0,
            },
        },
        overrides=list(overrides),
    )  # fmt: skip


def train_quiet(cfg):
    from pipeline.train.trainer import train

    return train(cfg, print_fn=None, track=False)


def rewrite_manifest(uri: str, split: str, change) -> None:
    loc = resolve(uri).child(split).child(MANIFEST_NAME)
    body = json.loads(loc.read_bytes())
    change(body)
    loc.write_bytes(json.dumps(body).encode())


@pytest.fixture
def no_ray():
    """Ray shut down before the test: a test can then show that nothing started it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> str:
    return prepare(str(tmp_path_factory.mktemp("digits8") / "ds"))


# --------------------------------------------------------------------------- manifests
def test_bad_digest_names_what_is_wrong():
    assert bad_digest(hashlib.sha256(b"x").hexdigest()) == ""
    assert bad_digest("") == "empty"
    assert bad_digest(None) == "empty"
    assert bad_digest("0" * 64) == "all zeros"
    assert bad_digest("ABCDEF" + "0" * 58) == "not 64 lowercase hex digits"
    assert bad_digest("a" * 63) == "not 64 lowercase hex digits"
    assert bad_digest("g" * 64) == "not 64 lowercase hex digits"


@pytest.mark.parametrize(
    ("value", "why"),
    [("0" * 64, "all zeros"), ("", "empty"), ("deadbeef", "not 64 lowercase hex digits")],
)
def test_manifest_without_usable_digests_fails_at_open(tmp_path, no_ray, value, why):
    import ray

    uri = prepare(str(tmp_path / "ds"))

    def zero(body):
        for shard in body["shards"]:
            shard["sha256"] = value

    rewrite_manifest(uri, "train", zero)
    with pytest.raises(DatasetError, match="no usable sha256") as err:
        open_dataset(train_cfg(uri, tmp_path), "train")
    message = str(err.value)
    assert shard_name(0) in message and why in message and MANIFEST_NAME in message
    assert "fmpipe prepare --out" in message
    with pytest.raises(DatasetError, match="no usable sha256"):
        train_quiet(train_cfg(uri, tmp_path))
    assert not ray.is_initialized()  # refused before any Ray work, let alone a worker


# --------------------------------------------------------------------------- config vs data
def test_channels_against_grey_data_fail_before_any_worker(digits8, tmp_path, no_ray):
    import ray

    cfg = train_cfg(digits8, tmp_path, "data.channels=3")
    with pytest.raises(ConfigMismatch) as err:
        train_quiet(cfg)
    message = str(err.value)
    assert "data.channels=3" in message and "grey (1 channel)" in message
    assert "set data.channels=1" in message and digits8 in message
    assert isinstance(err.value, ConfigError) and isinstance(err.value, DatasetError)
    assert not ray.is_initialized()
    check_config_against_manifest(train_cfg(digits8, tmp_path), open_dataset(cfg, "train"))


def test_resolution_against_16px_data_fails_before_any_worker(tmp_path, no_ray):
    import ray

    uri = prepare(str(tmp_path / "ds16"), resolution=16)
    with pytest.raises(ConfigMismatch) as err:
        train_quiet(train_cfg(uri, tmp_path, resolution=32))
    message = str(err.value)
    assert "data.resolution=32" in message and "16x16" in message
    assert "set data.resolution=16" in message and "--resolution 32" in message
    assert not ray.is_initialized()
    both = train_cfg(uri, tmp_path, "data.channels=3", resolution=32)
    with pytest.raises(ConfigMismatch, match=r"data\.channels=3.*; data\.resolution=32"):
        check_config_against_manifest(both, open_dataset(both, "train"))


def test_channels_and_resolution_left_unset_come_from_the_dataset(tmp_path, no_ray):
    """Issue 14 item 6: a config that does not set data.channels / data.resolution trains
    at the dataset's own (RGB 8x8 here, against the defaults 1 and 16); one that sets
    them is checked, never changed."""
    import ray

    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.stream import adopt_dataset_shape
    from pipeline.train.trainer import _check_inputs

    uri = str(tmp_path / "rgb8")
    prep = build_config({"prepare": {"source": "digits", "out": uri, "resolution": RES,
                                     "channels": 3, "shard_size": 400}})  # fmt: skip
    prepare_dataset(prep, log=None)
    unset = build_config({"seed": 0, "data": {"uri": uri}, "model": TINY_UNET})
    default = (unset.data.channels, unset.data.resolution)
    assert default == (1, 16)  # the library's defaults, not the dataset's
    inputs = _check_inputs(unset, None, None)
    assert inputs.data_shape == (3, RES, RES)
    assert (unset.data.channels, unset.data.resolution) == (3, RES)
    assert inputs.notes == [
        "data.channels=3 (the dataset's)",
        f"data.resolution={RES} (the dataset's)",
        "model.num_classes=10 (the dataset's classes)",
    ]
    assert unset.model.num_classes == 10  # the digits' ten: class-conditional
    assert not ray.is_initialized()
    # set on the command line (an override): checked against the dataset, not replaced
    given = build_config({"seed": 0, "data": {"uri": uri}, "model": TINY_UNET},
                         ["data.channels=1"])  # fmt: skip
    assert adopt_dataset_shape(given, open_dataset(given, "train")) == [
        f"data.resolution={RES} (the dataset's)",
        "model.num_classes=10 (the dataset's classes)",
    ]
    with pytest.raises(ConfigMismatch, match=r"data\.channels=1 but dataset .* is RGB"):
        _check_inputs(given, None, None)
    # evaluation decodes the reference split as training would, leaving the config alone
    from pipeline.eval.extract import dataset_shards

    fresh = build_config({"seed": 0, "data": {"uri": uri}})
    spec = dataset_shards(fresh, "val").spec
    assert (spec.channels, spec.resolution) == (3, RES)
    assert (fresh.data.channels, fresh.data.resolution) == default


# --------------------------------------------------------------------------- final errors
def test_final_data_error_looks_through_wrappers():
    inner = ShardIntegrityError("s3://b/train/shard-000001.tar", "a" * 64, "b" * 64, 10)

    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("wrapped")
            self.cause = cause

    class Group(Exception):
        def __init__(self):
            super().__init__("group")
            self.worker_failures = {1: ValueError("other"), 0: Wrapper(inner)}

    assert final_data_error(Group()) is inner
    assert final_data_error(RuntimeError("x")) is None
    try:
        try:
            raise inner
        except ShardIntegrityError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as outer:
        assert final_data_error(outer) is inner
    # bad samples lost to a failed read may pass on a retry: not final
    transient = TooManyBadSamples("storage down", final=False)
    assert final_data_error(transient) is None
    assert final_data_error(TooManyBadSamples("bad pngs")) is not None
    import pickle

    again = pickle.loads(pickle.dumps(inner))
    assert type(again) is ShardIntegrityError and str(again) == str(inner)
    assert "shard-000001.tar" in str(inner) and "a" * 64 in str(inner) and "b" * 64 in str(inner)


# --------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ray_local(s3_server):
    """Local Ray for this module (tests/localray.py), after the S3 env is set."""
    with local_ray(num_cpus=4, by_value=sys.modules[__name__]):
        yield


def tamper(uri: str, other_uri: str, split: str = "train", index: int = 0) -> tuple[str, str]:
    """Shard ``index`` of ``uri`` rewritten with another dataset's (other images), under the
    old manifest; returns (the manifest's sha256, the new bytes' sha256)."""
    target = resolve(uri).child(split).child(shard_name(index))
    expected = hashlib.sha256(target.read_bytes()).hexdigest()
    data = resolve(other_uri).child(split).child(shard_name(index)).read_bytes()
    assert hashlib.sha256(data).hexdigest() != expected
    target.write_bytes(data)
    return expected, hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_tampered_shard_fails_naming_it(ray_local, s3_bucket, tmp_path):
    """A train shard rewritten with other images (SeaweedFS) fails the run with the shard
    and both digests named; a tampered val shard fails in the driver, before the workers."""
    from pipeline.train.data import load_val_set

    uri = prepare(f"{s3_bucket}/digits", seed=0)
    other = prepare(f"{s3_bucket}/other", seed=1)
    expected, found = tamper(uri, other, index=1)
    # More images than the other train shards hold (1,617 - 400): the run must read shard 1
    # whatever order Ray Data's decode tasks finish in (64 images could all come from
    # shard 0 on a busy machine, and the run would end before shard 1 is read).
    cfg = train_cfg(uri, tmp_path, "train.total_images=1280")
    with pytest.raises(Exception) as err:  # Ray's wrapper; unwrapped below
        train_quiet(cfg)
    final = final_data_error(err.value)
    assert isinstance(final, ShardIntegrityError), err.value
    assert final.uri == f"{uri}/train/{shard_name(1)}"
    assert final.expected == expected and final.found == found
    assert "re-run `fmpipe prepare`" in str(final) and "\n" not in str(final)

    tamper(uri, other, split="val", index=0)
    with pytest.raises(ShardIntegrityError, match=rf"{uri}/val/{shard_name(0)}"):
        load_val_set(cfg, open_dataset(cfg, "val"), 100)


@pytest.mark.slow
def test_tampered_shard_in_the_stream_arrives_as_itself(ray_local, tmp_path):
    """Through Ray Data alone (the consumer in this process, no tracker): the stage's
    ShardIntegrityError reaches the consumer as itself, not as Ray's wrapper."""
    from pipeline.train.data import RayDataSource, build_train_stream

    uri = prepare(str(tmp_path / "a"), seed=0)
    tamper(uri, prepare(str(tmp_path / "b"), seed=1), index=2)
    cfg = train_cfg(uri, tmp_path)
    stream = build_train_stream(cfg, open_dataset(cfg, "train"), 0, 1)
    with pytest.raises(ShardIntegrityError, match=shard_name(2)) as err:
        for _ in RayDataSource.from_config(cfg).iter_batches(stream, 32):
            pass
    assert "\n" not in str(err.value)


def truncate(uri: str, index: int) -> str:
    target = resolve(uri).child("train").child(shard_name(index))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target.uri


def read_stream_loop(config: dict) -> None:
    """Ray Train loop: note the attempt, then read this worker's split to its end."""
    import ray.train

    from pipeline.train.data import RayDataSource

    with open(config["attempts"], "a") as log:
        log.write("start\n")
    source = RayDataSource()
    for _ in source.iter_batches(ray.train.get_dataset_shard("train"), config["micro_batch"]):
        pass


def fit_stream(cfg, tmp_path: Path, name: str, callbacks: list, max_failures: int):
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.data import build_train_stream

    attempts = tmp_path / f"{name}.attempts"
    trainer = TorchTrainer(
        read_stream_loop,
        train_loop_config={"attempts": str(attempts), "micro_batch": 32},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(tmp_path / "runs"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": build_train_stream(cfg, open_dataset(cfg, "train"), 0, 4)},
    )
    start = time.perf_counter()
    with pytest.raises(Exception) as err:  # Ray's wrapper; unwrapped by the caller
        trainer.fit()
    return err.value, time.perf_counter() - start, attempts.read_text().count("start")


@pytest.mark.slow
@pytest.mark.serial  # compares two runs' times: alone, so load does not skew one
def test_truncated_shard_fails_once_fast_with_the_shard_named(ray_local, tmp_path):
    """``FailureConfig(max_failures=2)`` runs a failing loop 3 times (the control, first,
    which also warms Ray Train up); with :class:`StopOnDataErrors` a truncated shard ends
    the run on its first attempt, in well under the control's time (measured side by side:
    a wall-clock bound alone would depend on the shared machine's load), and the driver
    gets the shard's error itself, one line naming the shard."""
    from pipeline.train.data import StopOnDataErrors

    uri = prepare(str(tmp_path / "ds"))
    shard_uri = truncate(uri, 1)
    cfg = train_cfg(uri, tmp_path)
    error, retried_seconds, attempts = fit_stream(cfg, tmp_path, "retried", [], 2)
    assert isinstance(final_data_error(error), ShardIntegrityError)
    assert attempts == 3  # what Ray Train does without the callback

    error, seconds, attempts = fit_stream(cfg, tmp_path, "stop", [StopOnDataErrors()], 2)
    final = final_data_error(error)
    assert isinstance(final, ShardIntegrityError), error
    assert final.uri == shard_uri and "\n" not in str(final)
    assert attempts == 1
    assert seconds < 0.7 * retried_seconds, (seconds, retried_seconds)


@pytest.mark.slow
def test_manifest_edited_to_match_still_counts_inner_damage(ray_local, tmp_path):
    """Bytes that match the manifest are the dataset as written: a truncated tar whose
    manifest was rewritten for it is read up to the damage, its lost samples counted
    against data.max_bad_fraction (the accounting of tests/test_stream.py), not refused."""
    from pipeline.data.stream import bad_sample_tracker
    from pipeline.train.data import RayDataSource, build_train_stream

    uri = prepare(str(tmp_path / "ds"))
    truncate(uri, 1)
    data = resolve(uri).child("train").child(shard_name(1)).read_bytes()

    def adopt(body):
        body["shards"][1]["sha256"] = hashlib.sha256(data).hexdigest()

    rewrite_manifest(uri, "train", adopt)
    cfg = train_cfg(uri, tmp_path, "data.max_bad_fraction=0.5")
    info = open_dataset(cfg, "train")
    source = RayDataSource.from_config(cfg, tracker=bad_sample_tracker(cfg, info, 0))
    rows = sum(len(b["t"]) for b in source.iter_batches(build_train_stream(cfg, info, 0, 1), 8))
    report = bad_sample_tracker(cfg, info, 0).check()
    broken = report.shards[shard_name(1)]
    assert broken.lost > 0 and "truncated or corrupt tar" in broken.error
    assert rows > 0 and report.skipped == broken.skipped
    text = resolve(uri).child("train").child(MANIFEST_NAME).read_bytes().decode()
    assert Manifest.from_json(text).bad_digests() == []


def test_bench_integrity_cost_times_hash_and_decode_of_the_same_shards(digits8):
    """`fmpipe bench data`'s integrity figure: sha256 per shard beside read_shard's time."""
    from pipeline.bench.data import integrity_cost

    cfg = train_cfg(digits8, Path("."))
    info = open_dataset(cfg, "train")
    shards = [info.location.child(s.name).read_bytes() for s in info.manifest.shards[:2]]
    cost = integrity_cost(cfg, shards, repeats=2)
    assert cost.shards == 2 and cost.mean_shard_bytes == sum(map(len, shards)) / 2
    assert cost.hash_ms_per_shard > 0 and cost.decode_ms_per_shard > 0
    assert cost.fraction_of_decode == cost.hash_ms_per_shard / cost.decode_ms_per_shard
