"""``fmpipe bench data --foreign``: another tool's JPEG shards, read from S3 (issue 14).

Shards as a user brings them: ``webdataset.ShardWriter`` shards of photo-like JPEGs
(smooth two-colour gradients, a few filled shapes, a little sensor-like noise; so their
JPEG sizes are those of photos, not of flat synthetic images) at mixed sizes, each side
drawn in [128, 512] pixels, all from ``seed``, uploaded to a SeaweedFS the benchmark
starts (or the S3 endpoint of the environment, ``AWS_ENDPOINT_URL_S3``, in a bucket of its
own that it empties afterwards). Streamed at ``data.resolution`` x ``data.resolution``
RGB (``data.resize=center_crop``). Every side does the same work per image: decode +
resize (short side) + centre crop, scaling to [-1, 1] CHW, and the per-sample seeded
``x_0`` and ``t`` (:func:`draw_noise_and_time`), in batches of ``data.batch_size``.

(a) plain loop: one process, one core, over the JPEG bytes already in memory:
    :func:`decode_image` (Pillow open, ``draft``, convert RGB, resize the short side,
    centre crop: the stream's own decode), scaling and pairing. Shown per core and x cores.
(b) ``webdataset``'s own pipeline: ``wds.WebDataset(urls).decode("pil").map(resize +
    crop)`` (Pillow's full-size decode, as ``.decode("pil")`` does, then the same bicubic
    short-side resize + centre crop) in a ``torch.utils.data.DataLoader`` with ``cores``
    worker processes, reading the same shards from the same S3 through presigned HTTP
    URLs (webdataset's own ``curl`` pipe). (b') the same loader with ``.map`` calling
    :func:`decode_image` on the raw bytes: exactly (a)'s work, so (b) vs (b') is what
    JPEG ``draft`` is worth.
(c) fmpipe: :func:`open_dataset` on the S3 address (indexes it first; that first index,
    which also starts Ray's workers, is timed on its own) and the training stream read as
    one training worker reads it (:func:`pipeline.bench.data.training_stream_rate`:
    :func:`build_train_stream`, ``streaming_split(1)``, ``RayDataSource.iter_batches``),
    :data:`STREAM_EPOCHS` epochs in one stream after a warm-up epoch.

Index throughput: :func:`build_index` over the same shards into a fresh index (Ray warm),
shards/s and MB/s, against raw GETs of the same shards (``boto3`` ``get_object``, body read
fully) with the same parallelism (``cores`` threads; build_index runs one Ray task per
shard on ``cores`` CPUs).
"""

from __future__ import annotations

import io
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.bench.data import STREAM_EPOCHS, training_stream_rate
from pipeline.config import Config, build_config
from pipeline.data.coupling import draw_noise_and_time
from pipeline.data.decode import decode_image, to_model_range
from pipeline.data.stream import decode_spec, open_dataset
from pipeline.flow import build_time_sampler
from pipeline.rayenv import ensure_ray, scoped_environ

PREFIX = "foreign"  # the shards' folder in the bucket
MIN_SIDE, MAX_SIDE = 128, 512
GOAL_VS_WDS = 1.0
GOAL_VS_LOOP = 0.8
GOAL_INDEX_VS_GET = 0.8


# --------------------------------------------------------------------------- the data
def photo_like_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """One JPEG of a random size (sides in [128, 512]) that compresses like a photo."""
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1.0) / 2.0
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    pixels = c0 + (c1 - c0) * ramp[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, size=2))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 4.0, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB").save(
        buf, "JPEG", quality=quality
    )
    return buf.getvalue()


def write_shards(
    client, bucket: str, folder: Path, images: int, per_shard: int, seed: int
) -> list[bytes]:
    """``images`` samples (``jpg`` + ``cls``) as ShardWriter shards, each uploaded to
    ``s3://bucket/PREFIX/`` as it closes; returns the JPEG bytes (for (a))."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def upload(path: str) -> None:
        client.upload_file(path, bucket, f"{PREFIX}/{Path(path).name}")
        os.unlink(path)

    jpegs = []
    pattern = str(folder / "photos-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, post=upload, verbose=0) as sink:
        for i in range(images):
            jpeg = photo_like_jpeg(rng)
            jpegs.append(jpeg)
            sink.write({"__key__": f"img{i:07d}", "jpg": jpeg, "cls": i % 10})
    return jpegs


# --------------------------------------------------------------------------- (a)
def plain_loop(cfg: Config, jpegs: list[bytes]) -> float:
    """(a) images/s of decode_image + scaling + pairing in this process (one core)."""
    spec = decode_spec(cfg)
    sampler = build_time_sampler("uniform")
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    batch = cfg.data.batch_size
    start = time.perf_counter()
    for first in range(0, len(jpegs), batch):
        chunk = jpegs[first : first + batch]
        pixels = np.stack([decode_image(data, "jpg", spec) for data in chunk])
        to_model_range(pixels)
        draw_noise_and_time([f"img{first + j:07d}" for j in range(len(chunk))], shape,
                            cfg.seed, 0, sampler)  # fmt: skip
    return len(jpegs) / (time.perf_counter() - start)


# --------------------------------------------------------------------------- (b)
class _ResizeCrop:
    """webdataset ``.map`` after ``.decode("pil")``: short side to R (bicubic), centre crop."""

    def __init__(self, resolution: int) -> None:
        self.res = resolution

    def __call__(self, sample: dict) -> tuple[str, np.ndarray, int]:
        image = sample["jpg"].convert("RGB")
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        image = image.resize((self.res, self.res), resample=Image.Resampling.BICUBIC,
                             box=(left, top, left + side, top + side))  # fmt: skip
        return sample["__key__"], np.asarray(image, dtype=np.uint8), int(sample["cls"])


class _DecodeImage:
    """(b') ``.map`` on raw bytes: fmpipe's decode_image, (a)'s exact work."""

    def __init__(self, cfg: Config) -> None:
        self.spec = decode_spec(cfg)

    def __call__(self, sample: dict) -> tuple[str, np.ndarray, int]:
        image = decode_image(sample["jpg"], "jpg", self.spec)
        return sample["__key__"], image, int(sample["cls"])


class _Collate:
    """Scale + pair a batch: what fmpipe's stage does after decoding."""

    def __init__(self, cfg: Config) -> None:
        self.shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        self.seed = cfg.seed

    def __call__(self, samples: list[tuple[str, np.ndarray, int]]) -> dict[str, torch.Tensor]:
        keys = [key for key, _, _ in samples]
        x_1 = torch.from_numpy(to_model_range(np.stack([image for _, image, _ in samples])))
        x_0, t = draw_noise_and_time(keys, self.shape, self.seed, 0, build_time_sampler("uniform"))
        label = torch.tensor([cls for _, _, cls in samples])
        return {"x_1": x_1, "x_0": x_0, "t": t, "label": label}


def webdataset_rate(
    cfg: Config, urls: list[str], workers: int, expected: int, *, same_work: bool
) -> float:
    """(b) / (b') images/s of webdataset over ``urls`` into a DataLoader of ``workers``."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    if same_work:
        dataset = dataset.map(_DecodeImage(cfg))
    else:
        dataset = dataset.decode("pil").map(_ResizeCrop(cfg.data.resolution))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.data.batch_size, num_workers=workers, collate_fn=_Collate(cfg)
    )
    images = 0
    start = time.perf_counter()
    for batch in loader:
        images += len(batch["t"])
    seconds = time.perf_counter() - start
    if images != expected:
        raise RuntimeError(f"webdataset saw {images} images, expected {expected}")
    return images / seconds


# --------------------------------------------------------------------------- index vs GET
@dataclass(frozen=True)
class Throughput:
    shards: int
    bytes: int
    seconds: float

    @property
    def shards_per_s(self) -> float:
        return self.shards / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds


def raw_get(client, bucket: str, keys: list[str], parallel: int) -> Throughput:
    """boto3 get_object of every key, body read fully, ``parallel`` at a time."""

    def get(key: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        total = sum(pool.map(get, keys))
    return Throughput(len(keys), total, time.perf_counter() - start)


def index_throughput(cfg: Config, index_uri: str) -> Throughput:
    """build_index of ``data.uri`` into a fresh ``index_uri`` (every shard read)."""
    from pipeline.data.index import build_index

    fresh = build_config(cfg.to_dict(), [f"data.index_uri={index_uri}"])
    start = time.perf_counter()
    result = build_index(fresh)
    seconds = time.perf_counter() - start
    assert result.read == len(result.index.shards), (result.read, result.reused)
    return Throughput(result.read, sum(s.size for s in result.index.shards), seconds)


# --------------------------------------------------------------------------- the run
@contextmanager
def _s3(stack_dir: Path) -> Iterator[str]:
    """The S3 endpoint: the environment's, or a SeaweedFS of our own; yields a fresh bucket."""
    from pipeline.stack.servers import SeaweedFS
    from pipeline.storage import boto3_client

    bucket = f"fmpipe-bench-foreign-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        if not os.environ.get("AWS_ENDPOINT_URL_S3"):
            s3 = stack.enter_context(SeaweedFS(stack_dir / "s3"))
            # The endpoint and keys reach Ray's workers through this process's environment.
            stack.enter_context(scoped_environ(s3.env()))
        client = boto3_client()
        client.create_bucket(Bucket=bucket)
        try:
            yield bucket
        finally:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            client.delete_bucket(Bucket=bucket)


@dataclass
class ForeignFigures:
    images: int
    shards: int
    mean_jpeg_bytes: float
    cores: int
    loop_per_core: float  # (a)
    wds: float  # (b)
    wds_same_work: float  # (b')
    fmpipe: float  # (c)
    first_index_s: float  # open_dataset's index build (Ray workers starting included)
    index: Throughput
    get: Throughput
    batch: int = 128

    @property
    def vs_wds(self) -> float:
        return self.fmpipe / self.wds

    @property
    def vs_loop(self) -> float:
        return self.fmpipe / (self.loop_per_core * self.cores)

    @property
    def index_vs_get(self) -> float:
        return self.index.mb_per_s / self.get.mb_per_s


def _verdict(value: float, goal: float) -> str:
    return f"(goal >= {goal:.1f}: {'met' if value >= goal else 'NOT met'})"


def run_foreign_benchmark(
    images: int = 2048,
    cores: int = 2,
    *,
    resolution: int = 64,
    per_shard: int = 128,
    batch_size: int = 128,
    seed: int = 0,
    log=print,
) -> ForeignFigures:
    """Write the shards, run (a), (b), (b'), (c) and the index vs GET figures; print them.

    A tiny run (a test's) gets smaller shards (at least 2 per core) and batches (at most
    the dataset, so the consumer's ``drop_last`` leaves it a batch)."""
    import ray

    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    per_shard = max(1, min(per_shard, -(-images // (2 * cores))))
    batch_size = min(batch_size, images)

    from pipeline.storage import boto3_client

    with (
        tempfile.TemporaryDirectory(prefix="fmpipe-bench-foreign-") as tmp,
        _s3(Path(tmp)) as bucket,
    ):
        home = Path(tmp) / "home"
        try:
            with scoped_environ({"FMPIPE_HOME": str(home)}):
                client = boto3_client()
                t0 = time.perf_counter()
                jpegs = write_shards(client, bucket, Path(tmp) / "w", images, per_shard, seed)
                written = time.perf_counter() - t0
                listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/")["Contents"]
                keys = sorted(o["Key"] for o in listing)
                uri = f"s3://{bucket}/{PREFIX}/"
                cfg = build_config(
                    overrides=[
                        f"seed={seed}",
                        f"data.uri={uri}",
                        f"data.resolution={resolution}",
                        "data.channels=3",
                        f"data.batch_size={batch_size}",
                        "data.resize=center_crop",
                    ]
                )
                ensure_ray(num_cpus=cores)
                ray.data.DataContext.get_current().enable_progress_bars = False
                mean_jpeg = sum(map(len, jpegs)) / len(jpegs)
                log(f"machine: {platform.machine()}, {os.cpu_count()} cores; Ray CPUs {cores}")
                log(
                    f"data: {images} photo-like JPEGs ({MIN_SIDE}-{MAX_SIDE} px a side, mean "
                    f"{mean_jpeg / 1e3:.1f} kB) in {len(keys)} ShardWriter shards at {uri} "
                    f"(written + uploaded in {written:.1f} s); streamed at {resolution}x"
                    f"{resolution} RGB, center_crop"
                )
                loop_before = plain_loop(cfg, jpegs)
                urls = [
                    client.generate_presigned_url(
                        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600
                    )
                    for key in keys
                ]
                wds_rate = webdataset_rate(cfg, urls, cores, images, same_work=False)
                wds_same = webdataset_rate(cfg, urls, cores, images, same_work=True)
                t0 = time.perf_counter()
                info = open_dataset(cfg, "train")  # indexes the address first
                first_index = time.perf_counter() - t0
                if info.num_samples != images:
                    raise RuntimeError(f"index found {info.num_samples} samples, not {images}")
                training_stream_rate(cfg, info, 0)  # warm-up epoch
                rate = training_stream_rate(cfg, info, 1, STREAM_EPOCHS)
                loop = (loop_before + plain_loop(cfg, jpegs)) / 2  # before and after (c)
                index = index_throughput(cfg, str(home / "index-again.json"))
                get = raw_get(client, bucket, keys, cores)
        finally:
            ray.shutdown()
    fig = ForeignFigures(images, len(keys), mean_jpeg, cores, loop, wds_rate, wds_same,
                         rate.images_per_s, first_index, index, get, batch_size)  # fmt: skip
    _print(fig, log)
    return fig


def _print(fig: ForeignFigures, log) -> None:
    n = fig.cores
    log(f"images/s (decode + resize + centre crop + scale + pair, batches of {fig.batch}):")
    log(f"  (a)  plain loop, decode_image, 1 core        {fig.loop_per_core:>9,.0f}")
    log(f"  (a x {n}) the same x {n} cores                   {fig.loop_per_core * n:>9,.0f}")
    log(f"  (b)  webdataset decode('pil')+map, {n} workers {fig.wds:>9,.0f}")
    log(f"  (b') webdataset + decode_image, {n} workers    {fig.wds_same_work:>9,.0f}")
    log(f"  (c)  fmpipe training stream from S3          {fig.fmpipe:>9,.0f}")
    log(f"ratio c/b: {fig.vs_wds:.2f} {_verdict(fig.vs_wds, GOAL_VS_WDS)}")
    log(f"ratio c/(a*cores): {fig.vs_loop:.2f} {_verdict(fig.vs_loop, GOAL_VS_LOOP)}")
    log(f"ratio c/b': {fig.fmpipe / fig.wds_same_work:.2f} (same decode work as (a))")
    log(
        f"index: first build in open_dataset {fig.first_index_s:.2f} s (Ray workers starting "
        f"included); again, fresh, Ray warm: {fig.index.seconds:.2f} s"
    )
    log(
        f"  build_index   {fig.index.shards_per_s:>8,.1f} shards/s {fig.index.mb_per_s:>8,.1f} MB/s"
    )
    log(
        f"  raw GET x{n}    {fig.get.shards_per_s:>8,.1f} shards/s {fig.get.mb_per_s:>8,.1f} MB/s"
        f"  ({fig.get.shards} shards, {fig.get.bytes / 1e6:.1f} MB)"
    )
    log(f"ratio index/GET: {fig.index_vs_get:.2f} {_verdict(fig.index_vs_get, GOAL_INDEX_VS_GET)}")
