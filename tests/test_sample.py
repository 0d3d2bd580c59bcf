"""fmpipe sample: exact, deterministic, resumable bulk sampling on a Ray actor pool."""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import os
import signal
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import webdataset as wds
from PIL import Image
from tiny import TINY_UNET

from pipeline.checkpoint import CheckpointError, TrainState, save_checkpoint
from pipeline.config import Config, build_config
from pipeline.data.manifest import MANIFEST_NAME, Manifest, shard_name
from pipeline.flow import GaussianVelocity
from pipeline.models import build_model
from pipeline.registry import ModelNotFound
from pipeline.sample import (
    JOB_FILE,
    ModelSource,
    SampleJobError,
    SamplerSettings,
    generate,
    load_model_source,
    sample_noise,
    sample_seed,
)
from pipeline.sample.sampler import integrate_range, render_shard
from pipeline.storage import resolve

MU, SIGMA = 0.3, 0.2  # Gaussian target per pixel, well inside [-1, 1]
STEP = 1 / 127.5  # one uint8 level in [-1, 1]

# Test-only model classes travel to Ray actors by value (tests/ is not a package).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_server):
    # SeaweedFS first: Ray workers take the S3 endpoint and credentials from the
    # environment they start with.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def sample_cfg(out: str, **sample) -> Config:
    return build_config({"sample": {"out": out, **sample}})


def gaussian_source(shape=(1, 4, 4)) -> ModelSource:
    return ModelSource.from_factory(
        functools.partial(GaussianVelocity, MU, SIGMA), shape, uri="test:gaussian"
    )


def _perturbed(cfg: Config, seed: int) -> torch.nn.Module:
    """A tiny U-Net with random non-zero weights (its output layer starts at zero)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, (1, 8, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def unet_checkpoint(directory: Path, seed: int = 0, run_id: str = "train-run-0") -> Path:
    """A real checkpoint of a class-conditional 8x8 U-Net (EMA differs from the raw weights)."""
    cfg = build_config(
        {"data": {"resolution": 8, "channels": 1}, "model": {**TINY_UNET, "num_classes": 3}}
    )
    save_checkpoint(
        directory,
        model=_perturbed(cfg, seed + 1000),
        ema=_perturbed(cfg, seed),
        state=TrainState(images_seen=100, step=1, data_shape=[1, 8, 8], mlflow_run_id=run_id),
        config=cfg,
    )
    return directory


def shard_bytes(out: str) -> dict[str, bytes]:
    location = resolve(out)
    return {name: location.child(name).read_bytes() for name in location.list_names(".tar")}


def read_samples(out: str) -> dict[int, tuple[np.ndarray, dict, int | None]]:
    """index -> (uint8 image (H, W), metadata, label) from every shard (any storage)."""
    found: dict[int, tuple[np.ndarray, dict, int | None]] = {}
    for data in shard_bytes(out).values():
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, parts in members.items():
            assert int(key) not in found, f"index {key} appears twice"
            image = np.asarray(Image.open(io.BytesIO(parts["png"])))
            label = int(parts["cls"]) if "cls" in parts else None
            found[int(key)] = (image, json.loads(parts["json"]), label)
    return found


# --------------------------------------------------------------------------- determinism units
def test_noise_comes_from_seed_and_index_alone() -> None:
    whole = sample_noise(7, range(0, 40), (1, 4, 4))
    assert torch.equal(sample_noise(7, [13, 2], (1, 4, 4)), whole[[13, 2]])
    assert not torch.equal(sample_noise(8, range(0, 40), (1, 4, 4)), whole)
    seeds = {sample_seed(s, i) for s in range(-3, 50) for i in range(2000)}
    assert len(seeds) == 53 * 2000 and all(0 <= x < 2**63 for x in seeds)


def _unet_settings(**kw) -> SamplerSettings:
    base = dict(
        seed=3,
        solver="euler",
        steps=4,
        atol=1e-5,
        rtol=1e-5,
        guidance_scale=2.0,
        label=None,
        num_classes=3,
        data_shape=(1, 8, 8),
        block_size=8,
    )
    return SamplerSettings(**{**base, **kw})


def test_network_batch_size_changes_bits_but_samples_do_not(tmp_path: Path) -> None:
    """Why compute blocks exist: CPU kernels give other float bits for other batch shapes.

    A sample integrated as part of [0, 24) or of [5, 13) (other shard boundaries, other
    neighbours) is bit-identical, for fixed-step and adaptive solvers; so is a shard's tar
    whatever the chunk (batch) size.
    """
    cfg = build_config({"model": {**TINY_UNET, "num_classes": 3}})
    model = _perturbed(cfg, 0).eval()
    x = torch.randn(64, 1, 8, 8)
    t = torch.rand(64)
    labels = torch.arange(64) % 3
    with torch.no_grad():
        whole = model(x, t, labels)
        parts = torch.cat(
            [model(x[i : i + 7], t[i : i + 7], labels[i : i + 7]) for i in range(0, 64, 7)]
        )
    print("max |batch 64 - batch 7| =", (whole - parts).abs().max().item())

    for solver in ("euler", "dopri5"):
        settings = _unet_settings(solver=solver, atol=1e-3, rtol=1e-3)
        big, _ = integrate_range(model, 0, 24, settings)
        small, nfes = integrate_range(model, 5, 13, settings)
        assert torch.equal(big[5:13], small)
        assert len(nfes) == 2  # blocks [0, 8) and [8, 16)
    a, _ = render_shard(model, 3, 21, _unet_settings(chunk_size=1))
    b, _ = render_shard(model, 3, 21, _unet_settings(chunk_size=1000))
    assert a == b


def test_actor_sets_torch_threads_where_it_samples(tmp_path: Path) -> None:
    """Ray Data calls the actor on another thread than its constructor: the thread count is
    set there, and not in the constructor, whose thread would otherwise run multi-threaded
    work and leave a second OpenMP team in the process (libgomp then throttles)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.sample.sampler import SamplerActor

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    settings = _unet_settings(torch_threads=wanted, out_uri=str(tmp_path / "out"), num_classes=0)
    actor = SamplerActor(functools.partial(GaussianVelocity, MU, SIGMA), settings)
    assert torch.get_num_threads() == before  # the constructor left this thread alone

    def call() -> tuple[int, dict]:
        rows = actor({"shard": np.array([0]), "start": np.array([0]), "stop": np.array([8])})
        return torch.get_num_threads(), rows

    try:
        with ThreadPoolExecutor(1) as pool:
            threads, rows = pool.submit(call).result()
    finally:
        torch.set_num_threads(before)  # the rest of the session keeps its thread count
    assert threads == wanted
    assert list(rows["num_samples"]) == [8]
    assert (tmp_path / "out" / shard_name(0)).exists()


def test_bf16_sampling_is_block_exact_and_close_to_fp32() -> None:
    """sample.precision=bf16: autocast around the network only; blocks keep it exact."""
    cfg = build_config({"model": {**TINY_UNET, "num_classes": 3}})
    model = _perturbed(cfg, 0).eval()
    fp32, _ = integrate_range(model, 0, 16, _unet_settings())
    bf16_big, _ = integrate_range(model, 0, 24, _unet_settings(precision="bf16"))
    bf16_small, _ = integrate_range(model, 5, 13, _unet_settings(precision="bf16"))
    assert torch.equal(bf16_big[5:13], bf16_small)
    assert bf16_big.dtype == torch.float32 and torch.isfinite(bf16_big).all()
    assert not torch.equal(bf16_big[:16], fp32)  # the arithmetic really changed
    assert (bf16_big[:16] - fp32).abs().max() < 0.1
    meta = _unet_settings(precision="bf16").sample_meta(3, 1)
    assert meta["precision"] == "bf16"
    assert "precision" not in _unet_settings().sample_meta(3, 1)


# --------------------------------------------------------------------------- the Ray job
def test_exact_count_unique_indices_webdataset_and_manifest(tmp_path: Path, capfd) -> None:
    out = str(tmp_path / "out")
    cfg = sample_cfg(out, num_samples=100, shard_size=32, num_actors=2, batch_size=8, seed=5)
    lines: list[str] = []
    result = generate(
        cfg, source=gaussian_source(), block_size=8, track=False, log_line=lines.append
    )
    # Ray's C++ notice on actor pools with restarts (ray#53727) stays off the console
    assert "core_worker.cc" not in capfd.readouterr().err
    # progress as shards come back: the first and the last at least, counts that only grow
    progress = [line for line in lines if line.startswith("[sample]")]
    assert progress[0].startswith("[sample] 1 / 4 shards")
    assert progress[-1].startswith("[sample] 4 / 4 shards  100 / 100 samples (100.0%)")
    counts = [int(line.split()[1]) for line in progress]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)

    assert result.num_samples == 100 and result.samples_written == 100
    assert result.shards == result.shards_written == 4
    assert sorted(os.listdir(out)) == sorted(
        [JOB_FILE, MANIFEST_NAME] + [shard_name(j) for j in range(4)]
    )

    # read back by the webdataset library itself, in shard order
    urls = [f"file:{tmp_path / 'out' / shard_name(j)}" for j in range(4)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pill"))
    keys = [s["__key__"] for s in samples]
    assert keys == [f"{i:010d}" for i in range(100)]
    for i, s in enumerate(samples):
        assert s["png"].size == (4, 4) and s["png"].mode == "L"
        meta = s["json"]
        assert meta["index"] == i and meta["seed"] == 5
        assert meta["solver"] == "euler" and meta["steps"] == 32
        assert meta["model"] == "test:gaussian" and meta["label"] is None
        assert "cls" not in s

    manifest = Manifest.from_json((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest.split == "samples" and manifest.num_samples == 100
    assert (manifest.resolution, manifest.channels, manifest.image_format) == (4, 1, "png")
    assert [s.num_samples for s in manifest.shards] == [32, 32, 32, 4]
    for info in manifest.shards:
        data = (tmp_path / "out" / info.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.sha256
    assert manifest.extra["seed"] == 5 and manifest.extra["solver"] == "euler"
    assert manifest.extra["steps"] == 32 and manifest.extra["model_uri"] == "test:gaussian"
    assert result.nfe_per_sample == 32
    assert result.grid_path is not None and result.grid_path.is_file()
    assert Image.open(result.grid_path).size[0] > 8 * 4


def test_bit_identical_across_batch_sizes_and_actor_counts(tmp_path: Path) -> None:
    ckpt = unet_checkpoint(tmp_path / "ckpt")
    runs = {}
    for name, batch, actors in (("a", 8, 1), ("b", 24, 2)):
        out = str(tmp_path / name)
        cfg = sample_cfg(
            out,
            model=str(ckpt),
            num_samples=40,
            shard_size=16,
            batch_size=batch,
            num_actors=actors,
            steps=4,
            guidance_scale=2.0,
            seed=11,
            pairs=True,
        )
        result = generate(cfg, block_size=8, track=False)
        assert result.num_samples == 40
        runs[name] = (shard_bytes(out), result.manifest)
    assert runs["a"][0] == runs["b"][0]  # every shard byte for byte
    assert [s.sha256 for s in runs["a"][1].shards] == [s.sha256 for s in runs["b"][1].shards]
    _check_coupled_set(tmp_path / "a", cfg)

    samples = read_samples(str(tmp_path / "a"))
    assert sorted(samples) == list(range(40))
    assert all(label == i % 3 for i, (_, _, label) in samples.items())  # classes cycle
    assert samples[0][1]["guidance_scale"] == 2.0
    images = np.stack([img for img, _, _ in samples.values()])
    assert images.std() > 1.0  # not a constant image: the network did something
    assert runs["a"][1].class_names == ["0", "1", "2"]
    assert runs["a"][1].extra["train_run_id"] == "train-run-0"


def _check_coupled_set(out: Path, cfg: Config) -> None:
    """Issue 16's exactness: the pairs read back are the sampler's own. The x_0 a reader
    regenerates for pair i, integrated by the same network in the same blocks, gives the
    stored float32 x_1 bit for bit, and the PNG is that x_1 rounded to 8 bits."""
    from pipeline.data.pairs import open_pair_set, read_pair_shard
    from pipeline.sample.plan import sampler_settings
    from pipeline.sample.sampler import integrate_range, prepare_model, to_uint8_hwc
    from pipeline.sample.source import load_model_source

    pair_set = open_pair_set(resolve(str(out)))
    assert pair_set.num_pairs == 40 and pair_set.seed == 11 and pair_set.data_shape == (1, 8, 8)
    assert pair_set.lineage["solver"] == "euler" and pair_set.lineage["steps"] == 4
    parts = [read_pair_shard(data, pair_set, name) for name, data in shard_bytes(str(out)).items()]
    pairs = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    assert pairs["index"].tolist() == list(range(40))
    assert torch.equal(pairs["x_0"], sample_noise(11, range(40), (1, 8, 8)))
    assert pairs["label"].tolist() == [i % 3 for i in range(40)]

    source = load_model_source(cfg)
    settings = sampler_settings(cfg, source, None, block=8)
    x_1, _ = integrate_range(prepare_model(source.factory(), torch.device("cpu")), 0, 40, settings)
    assert torch.equal(pairs["x_1"], x_1)
    images = read_samples(str(out))
    assert all(
        np.array_equal(images[i][0], to_uint8_hwc(x_1[i : i + 1])[0, ..., 0]) for i in images
    )


def test_rerun_writes_only_the_missing_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = sample_cfg(str(out), num_samples=64, shard_size=16, seed=1, steps=8)
    first = generate(cfg, source=gaussian_source(), block_size=8, track=False)
    assert first.shards_written == 4
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    original = (out / shard_name(2)).read_bytes()

    (out / shard_name(2)).unlink()
    again = generate(cfg, source=gaussian_source(), block_size=8, track=False)
    assert (again.shards_written, again.samples_written, again.num_samples) == (1, 16, 64)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    for name in before:
        if name != shard_name(2):
            assert after[name] == before[name], f"{name} was rewritten"
    assert after[shard_name(2)] != before[shard_name(2)]
    assert (out / shard_name(2)).read_bytes() == original
    assert again.manifest.shards == first.manifest.shards

    nothing = generate(cfg, source=gaussian_source(), block_size=8, track=False)
    assert nothing.shards_written == 0 and nothing.num_samples == 64
    assert "speed: nothing to generate" in nothing.summary_lines()[1]
    assert "samples/s" in first.summary_lines()[1]

    # A broken object under a final name is detected and redone.
    (out / shard_name(0)).write_bytes(b"not a tar")
    fixed = generate(cfg, source=gaussian_source(), block_size=8, track=False)
    assert fixed.shards_written == 1 and fixed.manifest.shards == first.manifest.shards

    # Another job's settings on the same output are refused, naming what differs.
    other = sample_cfg(str(out), num_samples=64, shard_size=16, seed=2, steps=8)
    with pytest.raises(SampleJobError, match=r"another job \(seed: 1 there, 2 now\)"):
        generate(other, source=gaussian_source(), block_size=8, track=False)
    # Without the job file, shards of another seed are still told apart (their metadata).
    (out / JOB_FILE).unlink()
    redone = generate(other, source=gaussian_source(), block_size=8, track=False)
    assert redone.shards_written == 4
    assert {meta["seed"] for _, meta, _ in read_samples(str(out)).values()} == {2}

    # An output started by an older fmpipe (its job file lacks a key added since, here the
    # layout): complete, it is used as it is; with a shard missing, it is refused, since
    # new shards could differ from the old ones in the last bits.
    job = json.loads((out / JOB_FILE).read_text())
    del job["identity"]["layout"]
    (out / JOB_FILE).write_text(json.dumps(job))
    complete = generate(other, source=gaussian_source(), block_size=8, track=False)
    assert complete.shards_written == 0 and complete.num_samples == 64
    (out / shard_name(3)).unlink()
    with pytest.raises(SampleJobError, match=r"older fmpipe, which did not record layout"):
        generate(other, source=gaussian_source(), block_size=8, track=False)
    assert not (out / shard_name(3)).exists()


def test_adaptive_job_ignores_steps_end_to_end(tmp_path: Path) -> None:
    """dopri5 chooses its own steps: another --steps is the same job, bit for bit."""
    out = tmp_path / "out"
    cfg = sample_cfg(str(out), num_samples=16, shard_size=8, solver="dopri5", steps=4)
    cfg.sample.atol = cfg.sample.rtol = 1e-3
    first = generate(cfg, source=gaussian_source(), block_size=8, track=False)
    original = (out / shard_name(1)).read_bytes()
    assert read_samples(str(out))[3][1]["steps"] is None
    (out / shard_name(1)).unlink()

    cfg.sample.steps = 16
    again = generate(cfg, source=gaussian_source(), block_size=8, track=False)
    assert (again.shards_written, again.num_samples) == (1, 16)
    assert (out / shard_name(1)).read_bytes() == original
    assert again.manifest.shards == first.manifest.shards
    assert again.manifest.extra["steps"] is None and again.manifest.extra["atol"] == 1e-3


class KillOnce(GaussianVelocity):
    """The Gaussian velocity, but the process is SIGKILLed at call ``at`` (once per job)."""

    def __init__(self, marker: str, at: int) -> None:
        super().__init__(MU, SIGMA)
        self.marker, self.at, self.calls = marker, at, 0

    def forward(self, x_t, t, label=None):
        self.calls += 1
        if self.calls == self.at:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x_t, t, label)


def test_killed_actor_is_retried_and_the_job_ends_with_exactly_n(tmp_path: Path) -> None:
    marker = tmp_path / "killed.pid"
    # euler 4 steps, 2 blocks per shard: 8 calls per shard; call 12 is mid second shard.
    factory = functools.partial(KillOnce, str(marker), 12)
    source = ModelSource.from_factory(factory, (1, 4, 4), uri="test:kill-once")
    out = str(tmp_path / "out")
    cfg = sample_cfg(out, num_samples=64, shard_size=16, steps=4, num_actors=1, seed=9)
    result = generate(cfg, source=source, block_size=8, track=False)

    assert marker.is_file(), "the actor was never killed"
    assert int(marker.read_text()) != os.getpid()  # an actor process, not the driver
    assert result.num_samples == 64 and result.shards == 4
    samples = read_samples(out)
    assert sorted(samples) == list(range(64))
    reference = sample_cfg(str(tmp_path / "ref"), num_samples=64, shard_size=16, steps=4, seed=9)
    clean = generate(reference, source=gaussian_source(), block_size=8, track=False)
    clean_images = {i: img for i, (img, _, _) in read_samples(clean.out_uri).items()}
    assert all(np.array_equal(img, clean_images[i]) for i, (img, _, _) in samples.items())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_gaussian_target_mean_and_covariance(where: str, tmp_path: Path, request) -> None:
    """Exact velocity of N(mu, sigma^2 I): sample moments match the target.

    Tolerances (N = 1000, D = 16 pixels): |mean - mu| < 0.03 (4.7 standard errors of
    sigma / sqrt(N) = 0.0063) and |cov - sigma^2 I| < 0.009 entrywise (5 standard errors of
    sigma^2 sqrt(2 / N) = 0.0018); uint8 quantisation adds variance (1/127.5)^2 / 12 = 5e-6.
    Each sample also equals the exact flow map mu + sigma x_0 of its own noise within one
    uint8 level plus the rk4-8 error (4e-4 here).
    """
    if where == "s3":
        out = f"{request.getfixturevalue('s3_bucket')}/samples/gauss"
    else:
        out = str(tmp_path / "gauss")
    n = 1000
    cfg = sample_cfg(out, num_samples=n, shard_size=250, solver="rk4", steps=8, num_actors=2)
    result = generate(cfg, source=gaussian_source(), block_size=50, track=False)
    assert result.num_samples == n and result.nfe_per_sample == 32

    samples = read_samples(out)
    assert sorted(samples) == list(range(n))
    x = np.stack([samples[i][0].astype(np.float64).reshape(-1) for i in range(n)])
    x = x / 127.5 - 1.0
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    assert np.abs(mean - MU).max() < 0.03, mean
    assert np.abs(cov - SIGMA**2 * np.eye(16)).max() < 0.009, cov

    exact = MU + SIGMA * sample_noise(0, range(n), (1, 4, 4)).double().reshape(n, -1).numpy()
    assert np.abs(x - np.clip(exact, -1, 1)).max() < STEP / 2 + 1e-3


# --------------------------------------------------------------------------- model sources
def test_registry_alias_and_version(mlflow_server, tmp_path: Path) -> None:
    from pipeline.tracking import Tracker

    cfg = build_config({"tracking": {"uri": mlflow_server.uri}})
    name = f"digits-{uuid.uuid4().hex[:8]}"
    trainer = Tracker.start(cfg, experiment="fmpipe-test-train", run_name="train")
    for seed, path in ((0, "checkpoints/a"), (1, "checkpoints/b")):
        ckpt = unet_checkpoint(tmp_path / path, seed=seed, run_id=trainer.run_id)
        trainer.log_artifacts(ckpt, path)
        trainer.register_model_version(name, path)
    trainer.set_alias(name, "champion", "1")
    trainer.end()

    by_alias = load_model_source(cfg, f"models:/{name}@champion")
    by_version = load_model_source(cfg, f"models:/{name}/2")
    assert (by_alias.version, by_alias.alias, by_alias.name) == ("1", "champion", name)
    assert by_version.version == "2" and by_version.digest != by_alias.digest
    assert by_alias.train_run_id == trainer.run_id and by_alias.num_classes == 3

    out = str(tmp_path / "out")
    run_cfg = copy.deepcopy(cfg)
    run_cfg.sample = build_config(
        {
            "sample": {
                "model": f"models:/{name}@champion",
                "out": out,
                "num_samples": 16,
                "shard_size": 16,
                "steps": 2,
            }
        }
    ).sample
    result = generate(run_cfg, block_size=8)
    assert result.manifest.extra["model_version"] == "1"
    assert read_samples(out)[0][1]["model_version"] == "1"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(result.mlflow_run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == cfg.tracking.sample_experiment
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model_uri"] == f"models:/{name}@champion" and params["model_version"] == "1"
    assert (params["solver"], params["steps"], params["num_samples"], params["seed"]) == (
        "euler",
        "2",
        "16",
        "0",
    )
    assert run.data.tags["fmpipe.train_run_id"] == trainer.run_id
    assert run.data.tags["fmpipe.output_uri"] == out
    assert {"samples_per_sec", "nfe_per_sample"} <= set(run.data.metrics)
    assert run.data.metrics["nfe_per_sample"] == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"grid.png", "samples", "config.yaml"} <= artifacts
    manifest_text = client.download_artifacts(
        run.info.run_id, f"samples/{MANIFEST_NAME}", str(tmp_path)
    )
    assert Manifest.from_json(Path(manifest_text).read_text()) == result.manifest

    with pytest.raises(ModelNotFound, match="does not exist"):
        load_model_source(cfg, f"models:/{name}-missing@champion")
    with pytest.raises(ModelNotFound, match="has no alias 'nosuch'"):
        load_model_source(cfg, f"models:/{name}@nosuch")
    with pytest.raises(ModelNotFound, match="has no version 9"):
        load_model_source(cfg, f"models:/{name}/9")


def test_checkpoint_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    ckpt = unet_checkpoint(tmp_path / "ckpt")
    remote = resolve(f"{s3_bucket}/runs/ckpt")
    for file in ckpt.iterdir():
        remote.child(file.name).write_bytes(file.read_bytes())
    cfg = build_config({"sample": {"use_ema": True}})
    local = load_model_source(cfg, str(ckpt))
    from_s3 = load_model_source(cfg, remote.uri)
    assert from_s3.digest == local.digest and from_s3.data_shape == (1, 8, 8)
    raw = load_model_source(build_config({"sample": {"use_ema": False}}), str(ckpt))
    assert raw.digest != local.digest  # EMA weights by default, raw ones when asked
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_source(cfg, f"{s3_bucket}/runs/nothing-here")


def test_checkpoint_that_does_not_fit_gets_a_clear_error(tmp_path: Path) -> None:
    ckpt = unet_checkpoint(tmp_path / "ckpt")
    text = (ckpt / "config.yaml").read_text().replace("base_channels: 8", "base_channels: 16")
    (ckpt / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="does not fit the network"):
        load_model_source(build_config(), str(ckpt))


# --------------------------------------------------------------------------- the command
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from jobs.sample import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_samples_a_checkpoint_and_logs_a_run(tmp_path: Path, home: Path, capsys) -> None:
    ckpt = unet_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "samples"
    code, stdout, err = run_cli(
        capsys,
        "--model", str(ckpt), "--num-samples", "12", "--out", str(out), "--steps", "2",
        "--label", "1", "--guidance", "1.5", "sample.shard_size=8",
    )  # fmt: skip
    assert code == 0, err
    assert "samples: 12 in 2 shards" in stdout and "samples/s" in stdout
    assert "NFE per sample" in stdout and "wall time" in stdout
    assert "mlflow ui --backend-store-uri" in stdout
    grid = next(line for line in stdout.splitlines() if line.startswith("grid of the first"))
    assert Path(grid.split(": ", 1)[1]).is_file()
    assert str(home) in grid
    assert {label for _, _, label in read_samples(str(out)).values()} == {1}
    assert (home / "mlflow.db").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-dir", "neither models:/"),
        ("missing-alias", "registered model 'nope' does not exist"),
        ("bad-fit", "does not fit the network"),
        ("unwritable", "cannot create"),
        ("missing-bucket", "bucket 'no-such-bucket-fmpipe' does not exist"),
        ("label-range", "is not a class of model"),
    ],
)
def test_cli_errors_are_one_clear_line(
    case: str, message: str, tmp_path: Path, capsys, request
) -> None:
    ckpt = unet_checkpoint(tmp_path / "ckpt")
    out = str(tmp_path / "out")
    model = str(ckpt)
    extra: list[str] = []
    if case == "missing-dir":
        model = str(tmp_path / "no-such-checkpoint")
    elif case == "missing-alias":
        model = "models:/nope@champion"
    elif case == "bad-fit":
        text = (ckpt / "config.yaml").read_text().replace("num_classes: 3", "num_classes: 5")
        (ckpt / "config.yaml").write_text(text)
    elif case == "unwritable":
        (tmp_path / "a-file").write_text("x")
        out = str(tmp_path / "a-file" / "out")
    elif case == "missing-bucket":
        request.getfixturevalue("s3_server")
        out = "s3://no-such-bucket-fmpipe/out"
    elif case == "label-range":
        extra = ["--label", "7"]
    code, _, err = run_cli(capsys, "--model", model, "--out", out, "--num-samples", "4", *extra)
    # issue 17: bad input (model, checkpoint, settings, an --out under a file) exits 2
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("fmpipe sample:")]
    assert len(lines) == 1 and lines[0].startswith("fmpipe sample: error: "), err
    assert message in lines[0] and "Traceback" not in err
