"""``fmpipe bench data``: the training stream against a decode ceiling and a plain baseline.

All of them read the same shards from the same SeaweedFS (a real S3 server started for
the run) and do the same work per image: Pillow decode (:func:`decode_image`), scaling to
[-1, 1] CHW, and pairing with per-sample seeded ``x_0`` and ``t``.

(a) decode ceiling: one process decoding every image from tar bytes already in memory
    (stdlib ``tarfile`` walk, Pillow decode, scaling, pairing); images/s per core.
(a') fmpipe's own decode path in one process on the same bytes (its tar-header walk,
    :func:`read_shard`, scaling, :class:`PairingStage`): images/s per core. fmpipe's walk
    is cheaper than ``tarfile``'s, so (a') is above (a) for small images; ``c/(a'*cores)``
    is then the share of fmpipe's own per-core rate that Ray delivers on all the cores.
(b) baseline: the ``webdataset`` library reading the shards over HTTP (presigned URLs,
    webdataset's own curl pipe) into a ``torch.utils.data.DataLoader`` with the same number
    of worker processes as (c) uses CPUs.
(c) fmpipe: the stream ``fmpipe train`` reads, built by the same function
    (:func:`build_train_stream`, :data:`STREAM_EPOCHS` epochs in one Dataset, as training
    holds its epochs), split as Ray Train splits it for one worker
    (``streaming_split(1, equal=True)``) and consumed by the training loop's own consumer
    (:meth:`RayDataSource.iter_batches`: ``iter_torch_batches`` of micro-batches with
    ``drop_last``, float32 noise, coupling), here in the driver with no training step
    beside it: the most the data path can feed one worker on these cores. It runs after
    a warm-up epoch that starts Ray's worker processes; (a) runs once before and once
    after (c), and the mean is used.
(c1) the next :data:`EPOCH_STREAMS` epochs, each as a one-epoch stream of its own through
    the same path: each pays Ray Data's start-up (plan, executor, first tasks; ~0.35 s on
    2 CPUs), which (c) pays once.

Also the cost of ``ot`` coupling per batch size: images/s through ``couple`` alone, and
the cost of the shard integrity check (:func:`integrity_cost`: ``hashlib.sha256`` of each
shard's bytes, as :func:`~pipeline.data.stream.verify_shard` does in every decode task)
against fmpipe's decode of the same shards.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, build_config
from pipeline.data.coupling import PairingStage, couple, draw_noise_and_time
from pipeline.data.decode import decode_image, to_model_range
from pipeline.data.prepare import prepare_dataset
from pipeline.data.stream import (
    DatasetInfo,
    bad_sample_tracker,
    build_train_stream,
    decode_spec,
    open_dataset,
    read_shard,
)
from pipeline.flow import build_time_sampler
from pipeline.rayenv import ensure_ray, scoped_environ
from pipeline.stack.servers import SeaweedFS
from pipeline.storage import boto3_client
from pipeline.train.data import RayDataSource
from pipeline.train.loop import micro_batch_size

BUCKET = "fmpipe-bench"
STREAM_EPOCHS = 3  # (c): this many epochs in one stream, after the warm-up epoch
EPOCH_STREAMS = 2  # (c1): this many one-epoch streams, one after the other
A_PRIME = "(a') fmpipe 1 proc/core"
C_OVER_A_PRIME = "c/(a'*cores)"
C1 = "(c1) 1 epoch/stream"
C1_OVER_A = "c1/(a*cores)"


@dataclass
class DataFigures:
    resolution: int
    ceiling_per_core: float
    baseline: float
    fmpipe: float
    cores: int
    in_process_per_core: float = float("nan")
    per_epoch_streams: float = float("nan")  # (c1)

    @property
    def vs_baseline(self) -> float:
        return self.fmpipe / self.baseline

    @property
    def vs_ceiling(self) -> float:
        return self.fmpipe / (self.ceiling_per_core * self.cores)

    @property
    def per_epoch_vs_ceiling(self) -> float:
        return self.per_epoch_streams / (self.ceiling_per_core * self.cores)

    @property
    def vs_in_process(self) -> float:
        return self.fmpipe / (self.in_process_per_core * self.cores)


def _shard_bytes(info: DatasetInfo) -> list[bytes]:
    return [info.location.child(shard.name).read_bytes() for shard in info.manifest.shards]


def decode_ceiling(cfg: Config, shards: list[bytes]) -> float:
    """(a) images/s of one process decoding in-memory tar bytes (tar walk included)."""
    spec = decode_spec(cfg)
    sampler = build_time_sampler("uniform")
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    images = 0
    start = time.perf_counter()
    for data in shards:
        with tarfile.open(fileobj=_BytesReader(data), mode="r|") as tar:
            keys, pixels = [], []
            for member in tar:
                if member.name.endswith(".png"):
                    keys.append(member.name.split(".", 1)[0])
                    pixels.append(decode_image(tar.extractfile(member).read(), "png", spec))
            x_1 = to_model_range(np.stack(pixels))
            draw_noise_and_time(keys, shape, cfg.seed, 0, sampler)
            images += len(x_1)
    return images / (time.perf_counter() - start)


def fmpipe_in_process(cfg: Config, shards: list[bytes]) -> float:
    """(a') images/s of fmpipe's decode + pairing path in this process, same bytes."""
    spec = decode_spec(cfg)
    pairing = PairingStage.from_config(cfg, 0)
    images = 0
    start = time.perf_counter()
    for j, data in enumerate(shards):
        samples, _ = read_shard(data, f"shard-{j}", 0, spec, num_classes=10, shuffle=True)
        pairing(
            {
                "x_1": to_model_range(np.stack([image for _, _, image in samples])),
                "label": np.array([label for _, label, _ in samples], dtype=np.int64),
                "key": np.array([key for key, _, _ in samples], dtype=object),
            }
        )
        images += len(samples)
    return images / (time.perf_counter() - start)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        import io

        self._io = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._io.read(n)


class _Pair:
    """DataLoader collate: decode + scale + pair, the same work as the fmpipe stage."""

    def __init__(self, cfg: Config) -> None:
        self.spec = decode_spec(cfg)
        self.shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        self.seed = cfg.seed

    def __call__(self, samples: list[tuple[str, bytes, bytes]]) -> dict[str, torch.Tensor]:
        keys = [key for key, _, _ in samples]
        pixels = np.stack([decode_image(png, "png", self.spec) for _, png, _ in samples])
        x_0, t = draw_noise_and_time(keys, self.shape, self.seed, 0, build_time_sampler("uniform"))
        label = torch.tensor([int(cls) for _, _, cls in samples])
        return {"x_1": torch.from_numpy(to_model_range(pixels)), "x_0": x_0, "t": t, "label": label}


def webdataset_baseline(cfg: Config, workers: int) -> float:
    """(b) images/s of webdataset over presigned HTTP URLs into a DataLoader."""
    import webdataset as wds

    info = open_dataset(cfg, "train")
    client = boto3_client(cfg.storage)
    bucket, _, prefix = info.location.path.partition("/")
    urls = [
        client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": f"{prefix}/{shard.name}"}, ExpiresIn=3600
        )
        for shard in info.manifest.shards
    ]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple(
        "__key__", "png", "cls"
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        num_workers=workers,
        collate_fn=_Pair(cfg),
        persistent_workers=False,
    )
    images = 0
    start = time.perf_counter()
    for batch in loader:
        images += len(batch["t"])
    seconds = time.perf_counter() - start
    if images != info.num_samples:
        raise RuntimeError(f"baseline saw {images} images, expected {info.num_samples}")
    return images / seconds


def ot_cost(resolution: int, channels: int, batch_sizes=(128, 256, 512), repeats: int = 3):
    """images/s of ``couple`` with ot vs independent, per batch size (random data)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in batch_sizes:
        x_1 = torch.rand(batch, channels, resolution, resolution, generator=generator) * 2 - 1
        x_0 = torch.randn(batch, channels, resolution, resolution, generator=generator)
        start = time.perf_counter()
        for _ in range(repeats):
            couple(x_1, x_0, None, "ot")
        seconds = (time.perf_counter() - start) / repeats
        rows.append((batch, batch / seconds, seconds * 1000))
    return rows


@dataclass(frozen=True)
class IntegrityCost:
    """sha256 of whole shards against fmpipe's decode of the same shards, one process."""

    shards: int
    mean_shard_bytes: float
    hash_ms_per_shard: float  # hashlib.sha256 over one shard's bytes
    decode_ms_per_shard: float  # read_shard (tar walk + Pillow decode) of one shard

    @property
    def fraction_of_decode(self) -> float:
        return self.hash_ms_per_shard / self.decode_ms_per_shard

    @property
    def mb_per_s(self) -> float:
        return self.mean_shard_bytes / 1e6 / (self.hash_ms_per_shard / 1000)


def integrity_cost(cfg: Config, shards: list[bytes], repeats: int = 5) -> IntegrityCost:
    """What :func:`~pipeline.data.stream.verify_shard` adds to each decode task: the time
    of ``hashlib.sha256(data)`` per shard (best of ``repeats`` passes: the machine is
    shared) next to :func:`read_shard` of the same bytes (best of 2)."""
    spec = decode_spec(cfg)

    def best(passes: int, work) -> float:
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            for data in shards:
                work(data)
            times.append(time.perf_counter() - start)
        return min(times) * 1000 / len(shards)

    hash_ms = best(repeats, lambda data: hashlib.sha256(data).hexdigest())
    decode_ms = best(2, lambda data: read_shard(data, "s", 0, spec, num_classes=10))
    mean_bytes = sum(len(data) for data in shards) / len(shards)
    return IntegrityCost(len(shards), mean_bytes, hash_ms, decode_ms)


@dataclass(frozen=True)
class StreamRate:
    images: int  # images the consumer yielded (whole micro-batches)
    seconds: float  # from building the stream to its last batch

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def training_stream_rate(
    cfg: Config, info: DatasetInfo, first_epoch: int, num_epochs: int = 1
) -> StreamRate:
    """(c) images/s of the training path, driven here as one Ray Train worker drives it.

    The stream from :func:`build_train_stream`, the one split Ray Train's ``DataConfig``
    makes for one worker (``streaming_split(1, equal=True)``), and the loop's consumer
    (:meth:`RayDataSource.iter_batches` with the loop's micro-batch), read to the end.
    """
    micro = micro_batch_size(cfg.data.batch_size, 1, cfg.train.grad_accum)
    start = time.perf_counter()
    ds = build_train_stream(cfg, info, first_epoch, num_epochs)
    (split,) = ds.streaming_split(1, equal=True)
    source = RayDataSource.from_config(cfg, tracker=bad_sample_tracker(cfg, info, first_epoch))
    images = 0
    for batch in source.iter_batches(split, micro):
        images += len(batch["t"])
    return StreamRate(images, time.perf_counter() - start)


def _epoch_streams_rate(cfg: Config, info: DatasetInfo, first_epoch: int, streams: int) -> float:
    """(c1) images/s of ``streams`` one-epoch streams in a row, from ``first_epoch`` on."""
    images = seconds = 0.0
    for epoch in range(first_epoch, first_epoch + streams):
        rate = training_stream_rate(cfg, info, epoch)
        images += rate.images
        seconds += rate.seconds
    return images / seconds


def run_data_benchmark(
    resolutions: tuple[int, ...] = (32, 64),
    num_samples: int = 8000,
    cores: int = 2,
    log=print,
) -> list[DataFigures]:
    """Prepare ``num_samples`` synthetic RGB images per resolution into a SeaweedFS of its
    own, run (a), (a'), (b), (c), (c1) and (a) again on them (module doc) on a local Ray of
    ``cores`` CPUs, print the table and the ``ot`` cost, and return the rows."""
    import ray

    figures: list[DataFigures] = []
    costs: list[tuple[int, IntegrityCost]] = []
    with (
        tempfile.TemporaryDirectory(prefix="fmpipe-bench-") as tmp,
        SeaweedFS(Path(tmp) / "s3") as s3,
        # The server's endpoint and credentials go into this process's environment, the
        # one way they reach Ray's worker processes (they inherit it when ray.init starts
        # them; pipeline.storage never pickles secrets into a filesystem), and they leave
        # it with the server, so nothing after the run points at a server that is gone.
        scoped_environ(s3.env()),
    ):
        try:
            boto3_client().create_bucket(Bucket=BUCKET)
            ensure_ray(num_cpus=cores)
            log(f"machine: {platform.machine()}, {os.cpu_count()} cores; Ray CPUs {cores}")
            log(
                "(c) = the training stream (build_train_stream, 1-worker streaming_split, "
                "RayDataSource.iter_batches) read in this process"
            )
            log(
                f"{'res':>4} {'(a) ceiling/core':>17} {'(b) wds+DataLoader':>19} "
                f"{'(c) fmpipe':>11} {'c/b':>6} {'c/(a*cores)':>12} "
                f"{A_PRIME:>24} {C_OVER_A_PRIME:>13} {C1:>20} {C1_OVER_A:>13}"
            )
            for res in resolutions:
                uri = f"s3://{BUCKET}/shapes{res}"
                cfg = build_config(
                    overrides=[
                        "prepare.source=synthetic:shapes",
                        f"prepare.out={uri}",
                        f"prepare.resolution={res}",
                        "prepare.channels=3",
                        f"prepare.num_samples={num_samples}",
                        "prepare.val_fraction=0.0",
                        "prepare.shard_size=500",
                        f"prepare.parallel_threshold={num_samples * 10}",
                        f"data.uri={uri}",
                        f"data.resolution={res}",
                        "data.channels=3",
                        "data.batch_size=128",
                    ]
                )
                prepare_dataset(cfg, log=lambda _: None)
                info = open_dataset(cfg, "train")
                shards = _shard_bytes(info)
                ceiling_before = decode_ceiling(cfg, shards)
                in_process = fmpipe_in_process(cfg, shards)
                baseline = webdataset_baseline(cfg, workers=cores)
                training_stream_rate(cfg, info, 0)  # warm-up: Ray worker processes start
                fmpipe = training_stream_rate(cfg, info, 1, STREAM_EPOCHS).images_per_s
                per_epoch = _epoch_streams_rate(cfg, info, 1 + STREAM_EPOCHS, EPOCH_STREAMS)
                # (a) once before and once after (c): a shared machine's drift hits both
                ceiling = (ceiling_before + decode_ceiling(cfg, shards)) / 2
                row = DataFigures(res, ceiling, baseline, fmpipe, cores,
                                  in_process, per_epoch)  # fmt: skip
                figures.append(row)
                costs.append((res, integrity_cost(cfg, shards)))
                log(
                    f"{res:>4} {ceiling:>17,.0f} {baseline:>19,.0f} {fmpipe:>11,.0f} "
                    f"{row.vs_baseline:>6.2f} {row.vs_ceiling:>12.2f} "
                    f"{in_process:>24,.0f} {row.vs_in_process:>13.2f} "
                    f"{per_epoch:>20,.0f} {row.per_epoch_vs_ceiling:>13.2f}"
                )
            log("\nshard integrity check (sha256 of each shard's bytes in memory, per shard):")
            for res, cost in costs:
                log(
                    f"  res {res:>3}: {cost.hash_ms_per_shard:6.2f} ms per "
                    f"{cost.mean_shard_bytes / 1e6:.2f} MB shard ({cost.mb_per_s:,.0f} MB/s), "
                    f"{100 * cost.fraction_of_decode:.2f}% of its decode "
                    f"({cost.decode_ms_per_shard:,.1f} ms)"
                )
            log("\not coupling (exact assignment) on the consumer batch, 3x32x32 and 3x64x64:")
            for res in resolutions:
                for batch, per_s, ms in ot_cost(res, 3):
                    log(f"  res {res:>3} batch {batch:>4}: {ms:8.1f} ms, {per_s:>9,.0f} images/s")
        finally:
            ray.shutdown()
    return figures
