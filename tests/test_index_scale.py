"""The index at scale (issue 14): driver memory of :func:`build_index` over thousands of shards.

5,000 tiny shards (2 samples each: one tar built once, stored under 5,000 keys) in SeaweedFS,
indexed once as 1,000 of them and once as all 5,000. The driver keeps per-shard aggregates
only (no sample keys; at most a window of tasks in flight), so its peak memory per shard
must not grow with the number of shards. Measured with ``tracemalloc`` in the driver around
``build_index`` (Python allocations: the entries, the listing, the index JSON). ~60 s on 2
cores, most of it Ray tasks: figures in docs/benchmarks.md (input pipeline section).
"""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from localray import local_ray
from PIL import Image

from pipeline.config import build_config
from pipeline.data.index import build_index
from pipeline.storage import boto3_client

pytestmark = pytest.mark.slow

SMALL, LARGE = 1_000, 5_000


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(s3_server):
    """Local Ray for this module (tests/localray.py), after the S3 env is set."""
    with local_ray(num_cpus=2):
        yield


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))


def _tiny_shard(samples: int = 2) -> bytes:
    image = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(image, "PNG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(samples):
            for ext, data in (("png", image.getvalue()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"s{i:02d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _indexed(uri: str) -> tuple[int, int, float]:
    """(shards indexed, driver tracemalloc peak bytes, seconds) of one fresh build_index."""
    cfg = build_config({"data": {"uri": uri}})
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = build_index(cfg)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.read == len(result.index.shards)
    return result.read, peak, seconds


def test_index_driver_memory_per_shard_does_not_grow_with_the_shard_count(s3_bucket, capsys):
    client = boto3_client()
    bucket = s3_bucket.removeprefix("s3://")
    body = _tiny_shard()
    # shards 0..999 under a/, the other 4,000 under b/: "a/" is 1,000 shards, "a/,b/" 5,000
    keys = [f"{'a' if i < SMALL else 'b'}/{i:06d}.tar" for i in range(LARGE)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=body), keys))
    client.put_object(Bucket=bucket, Key="warm/0.tar", Body=body)
    _indexed(f"{s3_bucket}/warm/")  # imports, clients, Ray workers: not in the figures
    small = _indexed(f"{s3_bucket}/a/")
    large = _indexed(f"{s3_bucket}/a/,{s3_bucket}/b/")
    assert (small[0], large[0]) == (SMALL, LARGE)
    per_small, per_large = small[1] / SMALL, large[1] / LARGE
    with capsys.disabled():
        for shards, peak, seconds in (small, large):
            print(
                f"\nbuild_index {shards:,} shards: driver peak {peak / 1e6:.2f} MB = "
                f"{peak / shards:,.0f} B/shard, {seconds:.1f} s ({shards / seconds:,.0f} shards/s)"
            )
    assert per_large <= 1.2 * per_small, (per_small, per_large)
