"""``fmpipe bench eval``: feature extraction of the Ray Data job against a plain loop.

Same shards (a dataset split), same feature network, same batch size:

(a) baseline: :func:`pipeline.eval.extract.extract_local`, a plain loop in this process
    (read, check, decode each shard, the network on batches of ``B``), with the torch
    thread count each of (b)'s actors gets (``fmpipe sample``'s rule);
(b) :func:`pipeline.eval.extract.extract_ray` with ``A`` actors: decode tasks feeding an
    actor pool, features back to the driver. Timed two ways: the whole call (Ray job
    start, actors building the network) and its steady part (first batch back to last).

Prints images/s of each and ``b / (a * A)``: the fraction of ``A`` independent loops the
job delivers per actor (goal >= 0.9 in steady state).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from pipeline.bench.plain import torch_threads
from pipeline.config import Config
from pipeline.eval.extract import NetworkSpec, ShardSet, dataset_shards, extract_local, extract_ray

__all__ = ["run_eval_benchmark"]


def _network(cfg: Config, shard_set: ShardSet, kind: str) -> NetworkSpec:
    """The configured network; a classifier trained here for one epoch when none is
    registered (its speed does not depend on its accuracy)."""
    if kind == "inception":
        from pipeline.eval.job import network_spec

        inception = cfg.model_copy(deep=True)
        inception.eval.network = "inception"
        return network_spec(inception)
    import io

    from pipeline.eval.classifier import ClassifierSpec, save_classifier, train_classifier
    from pipeline.eval.extract import load_images

    images, labels = (torch.from_numpy(a) for a in load_images(shard_set))
    spec = ClassifierSpec(
        shard_set.spec.channels, shard_set.spec.resolution, max(2, shard_set.num_classes)
    )
    model = train_classifier(images[:512], labels[:512].clamp(min=0), spec, epochs=1)
    buffer = io.BytesIO()
    save_classifier(model, spec, buffer)
    return NetworkSpec("classifier", classifier=buffer.getvalue())


def run_eval_benchmark(
    cfg: Config,
    *,
    network: str = "classifier",
    split: str = "train",
    max_shards: int = 0,
    actors: int = 1,
    batch_size: int = 64,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Run (a) and (b) on ``split`` of ``data.uri`` (see module doc); returns the figures."""
    import ray

    from pipeline.rayenv import ensure_ray
    from pipeline.sample.pool import actor_resources

    shard_set = dataset_shards(cfg, split)
    if max_shards:
        shard_set = replace(shard_set, shards=shard_set.shards[:max_shards])
    spec = _network(cfg, shard_set, network)
    n = shard_set.num_samples
    started = ensure_ray()
    try:
        _, threads = actor_resources(min(actors, len(shard_set.shards)), False)
        built = spec.build("cpu")
        with torch_threads(threads):
            extract_local(shard_set, built, batch_size=batch_size, keep=16)  # warm-up pass
            t0 = time.perf_counter()
            alone = extract_local(shard_set, built, batch_size=batch_size, keep=16)
            plain_s = time.perf_counter() - t0
        arrivals: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        on_ray = extract_ray(
            shard_set,
            spec,
            num_actors=actors,
            batch_size=batch_size,
            keep=16,
            say=lambda _: None,
            on_batch=lambda k: arrivals.append((time.perf_counter(), k)),
        )
        ray_s = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    if not np.allclose(alone.stats.mean, on_ray.stats.mean, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the Ray job's features differ from the plain loop's")
    a = n / plain_s
    b = n / ray_s
    # Steady state: the images after the first batch, over the time from it to the last.
    span = arrivals[-1][0] - arrivals[0][0] if len(arrivals) > 1 else 0.0
    steady = (n - arrivals[0][1]) / span if span > 0 else float("nan")
    log(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"network {built.key} (d={built.dim}); {n:,} images of {shard_set.uri} "
        f"({len(shard_set.shards)} shards), batch {batch_size}, {threads} torch threads"
    )
    log(f"(a) plain loop, one process        {a:10.1f} images/s  ({plain_s:.1f} s)")
    log(f"(b) Ray Data job, {actors} actor(s)      {b:10.1f} images/s  ({ray_s:.1f} s, whole call)")
    log(f"    steady (first batch to last)   {steady:10.1f} images/s")
    log(f"b / (a x {actors}) = {b / (a * actors):.2f} whole call, "
        f"{steady / (a * actors):.2f} steady  (goal >= 0.9)")  # fmt: skip
    return {
        "plain_images_per_s": a,
        "ray_images_per_s": b,
        "ray_steady_images_per_s": steady,
        "ratio": b / (a * actors),
        "steady_ratio": steady / (a * actors),
    }
