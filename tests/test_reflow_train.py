"""Reflow through the Ray Train loop (issue 16): a coupled sample set streamed by Ray Data
as fixed (x_0, x_1) pairs, trained from the base model's weights, resumed, and registered
with its lineage. Real parts: local Ray, the session's MLflow server, local directories."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch
from localray import local_ray
from tiny import TINY_UNET, tiny_checkpoint

from pipeline.config import ConfigError, build_config
from pipeline.data.pairs import (
    PairSetError,
    build_pairs_stream,
    open_pair_set,
    read_pair_shard,
    split_pair_shards,
)
from pipeline.sample import generate
from pipeline.sample.determinism import sample_noise
from pipeline.storage import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local(s3_server):
    with local_ray(num_cpus=4, by_value=sys.modules[__name__]):
        yield


@pytest.fixture(scope="module")
def coupled(ray_local, tmp_path_factory):
    """96 pairs of a perturbed tiny U-Net in 3 shards of 32 (the last held out for val)."""
    root = tmp_path_factory.mktemp("coupled")
    ckpt = tiny_checkpoint(root / "base" / "checkpoint_000000000064", perturb=True)
    out = str(root / "pairs")
    cfg = build_config(
        {"sample": {"model": str(ckpt), "out": out, "num_samples": 96, "shard_size": 32,
                    "steps": 4, "seed": 5, "pairs": True}}
    )  # fmt: skip
    generate(cfg, block_size=8, track=False)
    return ckpt, out


def reflow_cfg(pairs: str, tmp_path, mlflow_uri: str, total: int, **data):
    return build_config(
        {
            "seed": 1,
            "data": {"pairs": pairs, "resolution": 8, "channels": 1, "batch_size": 16, **data},
            "model": {**TINY_UNET, "num_classes": 3},
            "train": {
                "run_name": "reflow-1", "storage_path": str(tmp_path / "runs"),
                "total_images": total, "warmup_images": 16, "num_workers": 1,
                "cpus_per_worker": 1, "torch_threads": 1, "checkpoint_every_images": 32,
                "val_every_images": 32, "grid_every_images": 10**6, "log_every_steps": 1,
                "registered_model_name": "reflowed",
            },
            "tracking": {"uri": mlflow_uri, "experiment": "reflow-test"},
        }
    )  # fmt: skip


def test_the_stream_gives_each_pair_the_samplers_own_noise(coupled, tmp_path):
    _, out = coupled
    pair_set = open_pair_set(resolve(out))
    train_shards, val_shards = split_pair_shards(pair_set)
    assert [s.name for s in val_shards] == ["shard-000002.tar"] and len(train_shards) == 2
    cfg = reflow_cfg(out, tmp_path, "", 64)
    rows = build_pairs_stream(cfg, pair_set, train_shards, 0, 2).take_all()
    assert len(rows) == 2 * 64  # two epochs of the two train shards, nothing of val
    stored = {}
    for shard in train_shards:
        data = resolve(out).child(shard.name).read_bytes()
        pairs = read_pair_shard(data, pair_set, shard.name)
        for i, x_1 in zip(pairs["index"].tolist(), pairs["x_1"], strict=True):
            stored[x_1.numpy().tobytes()] = i
    seen = set()
    for row in rows:
        index = stored[row["x_1"].tobytes()]  # the stored float32 x_1, bit for bit
        noise = sample_noise(5, [index], (1, 8, 8))[0]
        assert torch.equal(torch.from_numpy(row["x_0"].copy()), noise)  # the sampler's x_0
        assert 0.0 <= float(row["t"]) <= 1.0
        seen.add((index, int(row["epoch"]), float(row["t"])))
    assert len({i for i, _, _ in seen}) == 64
    by_epoch = {e: {i: t for i, ep, t in seen if ep == e} for e in (0, 1)}
    assert by_epoch[0] != by_epoch[1]  # t is drawn afresh per epoch, x_0 never


def test_settings_that_would_break_the_coupling_are_refused_before_any_worker(coupled, tmp_path):
    from pipeline.train.trainer import train

    _, out = coupled
    with pytest.raises(ConfigError, match=r"data\.coupling=ot with data\.pairs"):
        train(reflow_cfg(out, tmp_path, "", 64, coupling="ot"), print_fn=None, track=False)
    with pytest.raises(ConfigError, match=r"set data.channels=1 data.resolution=8"):
        train(reflow_cfg(out, tmp_path, "", 64, resolution=16), print_fn=None, track=False)
    with pytest.raises(
        PairSetError, match=r"holds no _manifest\.json: not a finished sample output"
    ):
        bad = reflow_cfg(out, tmp_path, "", 64)
        bad.data.pairs = str(coupled[0])  # a checkpoint folder, no sample manifest
        train(bad, print_fn=None, track=False)


def test_reflow_trains_from_the_base_resumes_and_registers_its_lineage(
    coupled, tmp_path, mlflow_server
):
    from mlflow import MlflowClient

    from pipeline.train.spec import InitWeights
    from pipeline.train.trainer import train

    ckpt, out = coupled
    init = InitWeights.from_checkpoint(ckpt, "base-ckpt")
    lineage = {"fmpipe.reflow.k": "1"}
    first = train(reflow_cfg(out, tmp_path, mlflow_server.uri, 64), init=init, print_fn=None,
                  lineage=lineage)  # fmt: skip
    assert first.images_seen == 64 and "val_loss" in first.metrics
    again = train(reflow_cfg(out, tmp_path, mlflow_server.uri, 96), init=init, print_fn=None,
                  lineage=lineage)  # fmt: skip
    assert again.resumed_from == 64 and again.images_seen == 96
    assert again.mlflow_run_id == first.mlflow_run_id

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    version = client.get_model_version("reflowed", again.registered_version)
    tags = version.tags
    assert tags["fmpipe.reflow.k"] == "1" and tags["fmpipe.reflow.pair_set"] == resolve(out).uri
    assert tags["fmpipe.reflow.solver"] == "euler" and tags["fmpipe.reflow.steps"] == "4"
    assert tags["fmpipe.reflow.pair_seed"] == "5"
    assert tags["manifest_hash"] == open_pair_set(resolve(out)).manifest.content_hash()
    run = client.get_run(first.mlflow_run_id)
    assert run.data.tags["fmpipe.init_from"] == "base-ckpt"
    assert run.data.tags["fmpipe.reflow.k"] == "1"


def test_fmpipe_reflow_samples_pairs_trains_registers_and_reuses_its_pairs(
    coupled, tmp_path, mlflow_server, monkeypatch
):
    """The job end to end on a checkpoint base: pairs sampled by the sample job, the run
    named after the base and k, registered with k=1; the same command finds its complete
    set; a base that is itself a k=1 reflow makes the next run k=2."""
    from mlflow import MlflowClient

    from pipeline.reflow import _lineage, _open_base, _pairs, _train_config, reflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    ckpt, _ = coupled
    cfg = build_config(
        {
            "seed": 2,
            "data": {"batch_size": 16},
            "sample": {"steps": 4, "shard_size": 32, "seed": 9},
            "reflow": {"base": str(ckpt), "num_pairs": 64},
            "train": {
                "run_name": "", "storage_path": str(tmp_path / "runs"), "total_images": 32,
                "warmup_images": 16, "cpus_per_worker": 1, "torch_threads": 1,
                "checkpoint_every_images": 32, "val_every_images": 32,
                "grid_every_images": 10**6, "registered_model_name": "reflowed-e2e",
            },
            "tracking": {"uri": mlflow_server.uri, "experiment": "reflow-e2e"},
        }
    )  # fmt: skip
    lines: list[str] = []
    result = reflow(cfg, print_fn=lines.append)
    assert (result.k, result.pairs_sampled, result.num_pairs) == (1, 64, 64)
    assert result.pairs_uri.startswith(str(tmp_path / "runs" / "reflow-pairs"))
    assert result.train.images_seen == 32
    assert "reflow-checkpoint_000000000064-k1" in result.train.run_uri
    pair_set = open_pair_set(resolve(result.pairs_uri))
    assert pair_set.seed == 9 and pair_set.lineage["steps"] == 4
    assert any("pairs" in line for line in result.summary_lines())

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    version = client.get_model_version("reflowed-e2e", result.train.registered_version)
    assert version.tags["fmpipe.reflow.k"] == "1"
    assert version.tags["fmpipe.reflow.base"] == str(ckpt)
    assert version.tags["fmpipe.reflow.pair_set"] == result.pairs_uri

    base = _open_base(cfg, tmp_path)
    assert _pairs(cfg, base, lines.append) == (result.pairs_uri, 0)  # reused, not resampled
    assert any("already at" in line for line in lines)

    cfg.reflow.base = f"models:/reflowed-e2e/{result.train.registered_version}"
    again = _open_base(cfg, tmp_path)
    assert again.k == 1 and again.name == "reflowed-e2e"
    next_run = _train_config(cfg, again, result.pairs_uri)
    pairs = hashlib.sha256(result.pairs_uri.encode()).hexdigest()[:8]
    assert next_run.train.run_name == f"reflow-reflowed-e2e-v{again.version}-k2-p{pairs}"
    # other pairs (another num_pairs or sampler): a run of their own, not one to resume
    other = _train_config(cfg, again, result.pairs_uri + "-other")
    assert other.train.run_name.startswith(f"reflow-reflowed-e2e-v{again.version}-k2-p")
    assert other.train.run_name != next_run.train.run_name
    # a 1-step student of it keeps k=1 and says how it is meant to be sampled
    cfg.train.objective, cfg.train.distill_steps = "distill", 1
    student = _train_config(cfg, again, result.pairs_uri)
    assert student.train.run_name == (
        f"distill-reflowed-e2e-v{again.version}-1step-pseudo_huber-unrolled-p{pairs}"
    )
    tags = _lineage(cfg, again)
    assert tags["fmpipe.reflow.k"] == "1" and tags["fmpipe.distill.steps"] == "1"
    assert tags["fmpipe.distill.states"] == "unrolled"  # where its jumps were trained from
    # another loss or states on the same pairs: a run of its own, named for them
    cfg.train.distill_states = "rollout"
    variant = _train_config(cfg, again, result.pairs_uri)
    assert variant.train.run_name == (
        f"distill-reflowed-e2e-v{again.version}-1step-pseudo_huber-rollout-p{pairs}"
    )
    assert _lineage(cfg, again)["fmpipe.distill.states"] == "rollout"
    cfg.train.distill_states = "unrolled"
    assert (tags["fmpipe.sample.solver"], tags["fmpipe.sample.steps"]) == ("euler", "1")

    # a version that records its sampling rule hands it to fmpipe sample; others do not
    from pipeline.sample.source import model_sampling_rule

    assert model_sampling_rule(cfg, cfg.reflow.base) is None  # no fmpipe.sample.* tags
    for key in ("fmpipe.sample.solver", "fmpipe.sample.steps"):
        client.set_model_version_tag("reflowed-e2e", again.version, key, tags[key])
    assert model_sampling_rule(cfg, cfg.reflow.base) == ("euler", 1)
    assert model_sampling_rule(cfg, str(ckpt)) is None  # a checkpoint carries no tags
