"""Feature extraction over shards: a plain loop in one process, or a Ray Data actor pool.

Both passes read the same :class:`ShardSet` (a dataset split or a sample set), decode each
shard whole (its sha256 checked against the manifest), run a :class:`FeatureNetwork` on
uint8 ``(N, C, R, R)`` batches and fold the features into a :class:`FeatureSet`:

- the running mean and covariance (:class:`StatsAccumulator`, float64, merged exactly),
- a fixed subset of at most ``keep`` feature rows for KID and precision/recall, chosen by
  a seeded hash of each sample's ``shard/key`` (so the same subset whatever the order in
  which actors return batches),
- every sample's label and, for a classifier, its predicted class and confidence.

The Ray pass: ``from_items`` (one row per shard) -> ``map_batches(_decode_shards)`` (tasks)
-> ``map_batches(_FeatureActor, ActorPoolStrategy(size=num_actors), batch_size=B)`` ->
the driver's ``iter_batches``. Only features travel back (``d`` float32 per image), never
covariances: a (2048, 2048) float64 partial sum is 32 MiB.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pipeline.data.decode import DecodeSpec
from pipeline.data.manifest import MANIFEST_NAME, Manifest
from pipeline.data.stream import (
    LabelRule,
    ShardRef,
    adopt_dataset_shape,
    decode_spec,
    label_rule,
    open_dataset,
    read_shard,
    verify_shard,
)
from pipeline.eval.features import FeatureNetwork, FeatureNetworkError
from pipeline.eval.frechet import FeatureStats, StatsAccumulator
from pipeline.storage import Location, StorageInputError, read_whole, resolve

__all__ = [
    "FeatureSet",
    "NetworkSpec",
    "ShardSet",
    "dataset_shards",
    "extract",
    "extract_local",
    "extract_ray",
    "load_images",
    "network_dim",
    "network_identity",
    "sample_shards",
]

NetworkKind = Literal["inception", "classifier"]


@dataclass(frozen=True)
class ShardSet:
    """The shards one evaluation reads: a dataset split or the output of ``fmpipe sample``.

    ``content_hash`` (sha256 of the manifest's shard list) changes exactly when the images
    do, so reference statistics are keyed by it.
    """

    uri: str  # for messages
    location: Location  # the directory that holds the shards
    shards: tuple[ShardRef, ...]
    spec: DecodeSpec
    content_hash: str
    num_classes: int
    class_names: tuple[str, ...] = ()
    labels: LabelRule | None = None  # another tool's label rule; None: read .cls
    made_by: str = ""  # a sample set's model (as `fmpipe sample` recorded it); "" otherwise

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def dataset_shards(cfg: Any, split: str, *, fresh: bool = True) -> ShardSet:
    """The ``split`` of ``data.uri`` (prepared or another tool's), decoded as training does
    (``data.channels`` / ``data.resolution`` left unset: the dataset's, as in training).
    ``fresh=False``: another tool's shards are not listed again when this process indexed
    them already (the second split of one dataset)."""
    info = open_dataset(cfg, split, fresh=fresh)
    cfg = cfg.model_copy(deep=True)  # the caller's config is not changed
    adopt_dataset_shape(cfg, info)
    return ShardSet(
        uri=f"{info.uri} ({split})",
        location=info.location,
        shards=tuple(info.shards),
        spec=decode_spec(cfg),
        content_hash=info.manifest.content_hash(),
        num_classes=info.manifest.num_classes,
        class_names=tuple(info.manifest.class_names),
        labels=label_rule(cfg, info),
    )


def sample_shards(uri: str, storage: Any = None) -> ShardSet:
    """The shards ``fmpipe sample`` wrote under ``uri`` (read through its ``_manifest.json``).

    Raises:
        StorageInputError: no manifest there (not a finished sample output).
    """
    where = resolve(uri, storage)
    manifest_loc = where.child(MANIFEST_NAME)
    if not manifest_loc.exists():
        raise StorageInputError(
            f"'{uri}' holds no {MANIFEST_NAME}: not the output of a finished `fmpipe sample` "
            "(re-run that command to finish it)"
        )
    manifest = Manifest.from_json(manifest_loc.read_bytes().decode("utf-8"), manifest_loc.uri)
    shards = tuple(
        ShardRef(s.name, where.child(s.name).path, where.child(s.name).uri, s.num_samples, s.sha256)
        for s in manifest.shards
    )
    return ShardSet(
        uri=uri,
        location=where,
        shards=shards,
        spec=DecodeSpec(resolution=manifest.resolution, channels=manifest.channels),
        content_hash=manifest.content_hash(),
        num_classes=manifest.num_classes,
        class_names=tuple(manifest.class_names),
        made_by=str(manifest.extra.get("model_uri") or "") if manifest.split == "samples" else "",
    )


# --------------------------------------------------------------------------- networks
@dataclass(frozen=True)
class NetworkSpec:
    """How to build a feature network in any process (picklable; weights travel as bytes
    for the classifier, as a URI resolved on each node for Inception)."""

    kind: NetworkKind
    uri: str = ""  # inception: weights URI ("" = the standard public file)
    sha256: str = ""  # inception: expected digest of the weights file ("" = not checked)
    cache_dir: str = ""  # inception: download cache ("" = $FMPIPE_HOME/cache/features)
    classifier: bytes = b""  # classifier: the saved classifier file's bytes

    def build(self, device: str = "cpu") -> FeatureNetwork:
        if self.kind == "inception":
            from pathlib import Path

            from pipeline.eval.inception import DEFAULT_INCEPTION_URI, load_inception

            return load_inception(
                self.uri or DEFAULT_INCEPTION_URI,
                cache_dir=Path(self.cache_dir) if self.cache_dir else None,
                sha256=self.sha256 or None,
                device=device,
            )
        if self.kind == "classifier":
            from pipeline.eval.classifier import load_classifier

            if not self.classifier:
                raise FeatureNetworkError("the classifier network needs a trained classifier")
            return load_classifier(io.BytesIO(self.classifier), device=device)
        raise FeatureNetworkError(f"unknown feature network {self.kind!r}")


# --------------------------------------------------------------------------- result
@dataclass
class FeatureSet:
    """What one extraction pass keeps of a shard set's features.

    Attributes:
        network_key: :attr:`FeatureNetwork.key` of the network that made them.
        stats: n, mean (d,) and covariance (d, d) of all n feature vectors, float64.
        kept: (m, d) float32, m <= keep: the rows whose seeded key hash is smallest.
        labels: (n,) int64, each sample's class (-1: unlabelled).
        predicted: (n,) int64 classifier predictions, or None (not a classifier).
        confidence: (n,) float64 max softmax probability, or None.
    """

    network_key: str
    stats: FeatureStats
    kept: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray | None = None
    confidence: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.stats.n

    def to_bytes(self) -> bytes:
        """An ``.npz`` (no pickle: arrays and one JSON string). The moments are stored as
        ``mu`` and ``sigma``, the names pytorch-fid, clean-fid and ADM read, so another
        tool can take the file as its reference statistics."""
        arrays: dict[str, np.ndarray] = {
            "n": np.array(self.stats.n),
            "mu": self.stats.mean,
            "sigma": self.stats.cov,
            "kept": self.kept,
            "labels": self.labels,
            "meta": np.array(json.dumps({"network_key": self.network_key, **self.meta})),
        }
        if self.predicted is not None and self.confidence is not None:
            arrays["predicted"], arrays["confidence"] = self.predicted, self.confidence
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> FeatureSet:
        """Read :meth:`to_bytes` output; ValueError naming ``where`` when it is not one."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                # files written before the standard names: mean / cov
                mu, sigma = ("mu", "sigma") if "mu" in z.files else ("mean", "cov")
                stats = FeatureStats(int(z["n"]), z[mu], z[sigma])
                has_pred = "predicted" in z.files
                return cls(
                    network_key=meta.pop("network_key"),
                    stats=stats,
                    kept=z["kept"],
                    labels=z["labels"],
                    predicted=z["predicted"] if has_pred else None,
                    confidence=z["confidence"] if has_pred else None,
                    meta=meta,
                )
        except Exception as exc:  # zip, missing member, bad JSON
            raise ValueError(
                f"{where} is not a feature-statistics file ({type(exc).__name__}: {exc}); "
                "delete it and it is computed again"
            ) from exc


def _rank(seed: int, name: str) -> int:
    """A seeded 64-bit hash of a sample's ``shard/key``: the order that picks kept rows."""
    digest = hashlib.blake2b(name.encode(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


class _Collector:
    """Folds feature batches into a :class:`FeatureSet` (order-free up to float rounding)."""

    def __init__(self, keep: int, seed: int) -> None:
        self.keep, self.seed = keep, seed
        self.acc = StatsAccumulator()
        self.heap: list[tuple[int, str, np.ndarray]] = []  # (-rank, name, row): max-heap
        self.labels: list[np.ndarray] = []
        self.predicted: list[np.ndarray] = []
        self.confidence: list[np.ndarray] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        features = np.asarray(batch["features"])
        if len(features) == 0:
            return
        self.acc.add(features)
        self.labels.append(np.asarray(batch["label"], dtype=np.int64))
        if "predicted" in batch:
            self.predicted.append(np.asarray(batch["predicted"], dtype=np.int64))
            self.confidence.append(np.asarray(batch["confidence"], dtype=np.float64))
        for name, row in zip(batch["name"], features, strict=True):
            item = (-_rank(self.seed, str(name)), str(name), row.astype(np.float32))
            if len(self.heap) < self.keep:
                heapq.heappush(self.heap, item)
            elif item[0] > self.heap[0][0]:
                heapq.heapreplace(self.heap, item)

    def result(self, network_key: str, meta: dict[str, Any]) -> FeatureSet:
        if self.acc.dim is None:
            raise ValueError("no images were read: every shard was empty or unreadable")
        kept = sorted(self.heap, key=lambda item: item[1])  # by name: a stable row order
        return FeatureSet(
            network_key=network_key,
            stats=self.acc.result(),
            kept=np.stack([row for _, _, row in kept]),
            labels=np.concatenate(self.labels),
            predicted=np.concatenate(self.predicted) if self.predicted else None,
            confidence=np.concatenate(self.confidence) if self.confidence else None,
            meta=meta,
        )


# --------------------------------------------------------------------------- one shard
def _shard_images(
    location: Location,
    shard: ShardRef,
    spec: DecodeSpec,
    num_classes: int,
    labels: LabelRule | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 (n, C, R, R), labels int64 (n,), names (n,) "shard/key")``.

    Raises:
        ShardIntegrityError: the bytes are not the ones the manifest names.
    """
    data = read_whole(location.filesystem, shard.path)
    verify_shard(data, shard.uri, shard.sha256)
    samples, _ = read_shard(data, shard.name, shard.num_samples, spec, num_classes=num_classes,
                            labels=labels)  # fmt: skip
    if not samples:
        c, r = spec.channels, spec.resolution
        return np.zeros((0, c, r, r), np.uint8), np.zeros(0, np.int64), np.zeros(0, object)
    images = np.stack([image for _, _, image in samples]).transpose(0, 3, 1, 2)
    return (
        np.ascontiguousarray(images),
        np.array([label for _, label, _ in samples], dtype=np.int64),
        np.array([f"{shard.name}/{key}" for key, _, _ in samples], dtype=object),
    )


def _run_network(network: FeatureNetwork, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features (and, for a classifier, predictions) of a uint8 (n, C, R, R) batch."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    out = {"features": network.features(tensor).astype(np.float32)}
    predict: Callable[[torch.Tensor], np.ndarray] | None = getattr(network, "predict", None)
    if predict is not None:
        probs = predict(tensor)
        out["predicted"] = probs.argmax(axis=1).astype(np.int64)
        out["confidence"] = probs.max(axis=1).astype(np.float64)
    return out


def _meta(shard_set: ShardSet, network: str) -> dict[str, Any]:
    return {
        "uri": shard_set.uri,
        "content_hash": shard_set.content_hash,
        "resolution": shard_set.spec.resolution,
        "channels": shard_set.spec.channels,
        "network": network,
    }


# --------------------------------------------------------------------------- local
def load_images(shard_set: ShardSet) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a (small) shard set in this process: ``(uint8 (N, C, R, R), labels
    int64 (N,))``, shards in manifest order. For training the classifier, not for scale."""
    parts = [
        _shard_images(shard_set.location, shard, shard_set.spec, shard_set.num_classes,
                      shard_set.labels)
        for shard in shard_set.shards
    ]  # fmt: skip
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def extract_local(
    shard_set: ShardSet,
    network: FeatureNetwork,
    *,
    batch_size: int = 64,
    keep: int = 10_000,
    seed: int = 0,
    on_shard: Callable[[int, int], None] | None = None,
) -> FeatureSet:
    """The plain loop: every shard in order, in this process (the benchmark's baseline)."""
    collector = _Collector(keep, seed)
    for j, shard in enumerate(shard_set.shards):
        images, labels, names = _shard_images(
            shard_set.location, shard, shard_set.spec, shard_set.num_classes, shard_set.labels
        )
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            out = _run_network(network, images[start:stop])
            collector.add({**out, "label": labels[start:stop], "name": names[start:stop]})
        if on_shard is not None:
            on_shard(j + 1, len(shard_set.shards))
    return collector.result(network.key, _meta(shard_set, network.name))


# --------------------------------------------------------------------------- Ray
def _decode_shards(
    batch: dict[str, np.ndarray], shard_set: ShardSet
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage (tasks): shard-name rows -> decoded image rows."""
    by_name = {s.name: s for s in shard_set.shards}
    for name in batch["shard"]:
        images, labels, names = _shard_images(
            shard_set.location, by_name[str(name)], shard_set.spec, shard_set.num_classes,
            shard_set.labels,
        )  # fmt: skip
        if len(images):
            yield {"image": images, "label": labels, "name": names}


class _FeatureActor:
    """Ray Data actor: builds the network once, then features for each image batch."""

    def __init__(self, network: NetworkSpec, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.network = network.build(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = _run_network(self.network, batch["image"])
        return {**out, "label": batch["label"], "name": batch["name"]}


def network_identity(network: NetworkSpec) -> tuple[str, str]:
    """``(key, name)`` of the network, built (once per process, on CPU) before any Ray
    work, so missing or foreign weights fail here with the file's name, not in an actor."""
    built = _built(network)
    return built.key, built.name


def network_dim(network: NetworkSpec) -> int:
    """The feature dimension d of the network (built as in :func:`network_identity`)."""
    return int(_built(network).dim)


def extract_ray(
    shard_set: ShardSet,
    network: NetworkSpec,
    *,
    num_actors: int = 1,
    batch_size: int = 64,
    use_gpu: bool = False,
    keep: int = 10_000,
    seed: int = 0,
    say: Callable[[str], None] = print,
    on_batch: Callable[[int], None] | None = None,
) -> FeatureSet:
    """The same :class:`FeatureSet` as :func:`extract_local`, from an actor pool on Ray
    (started locally when none is connected). ``on_batch(n)``: called as each batch of n
    images' features arrives (the benchmark's clock)."""
    import ray

    from pipeline.rayenv import ensure_ray, quiet_cpp_notices
    from pipeline.sample.pool import actor_resources

    key, name = network_identity(network)
    started = ensure_ray()
    try:
        # A shard is one decode block: more actors than shards would sit idle.
        num_actors = max(1, min(num_actors, len(shard_set.shards)))
        num_cpus, threads = actor_resources(num_actors, use_gpu)
        items = [{"shard": s.name} for s in shard_set.shards]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        decoded = dataset.map_batches(
            functools.partial(_decode_shards, shard_set=shard_set), batch_size=1, num_cpus=0.25
        )
        features = decoded.map_batches(
            _FeatureActor,
            fn_constructor_args=(network, "cuda" if use_gpu else "cpu", threads),
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=num_cpus,
            num_gpus=1 if use_gpu else 0,
        )
        collector = _Collector(keep, seed)
        total, done, said = shard_set.num_samples, 0, -math.inf
        import time

        with quiet_cpp_notices():
            for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
                collector.add(batch)
                done += len(batch["features"])
                if on_batch is not None:
                    on_batch(len(batch["features"]))
                now = time.perf_counter()
                if done >= total or now - said >= 10.0:
                    said = now
                    say(f"[eval] features {done:,} / {total:,} images ({name})")
        return collector.result(key, _meta(shard_set, name))
    finally:
        if started:
            ray.shutdown()


def extract(
    shard_set: ShardSet, network: NetworkSpec, settings: Any, *, seed: int,
    say: Callable[[str], None] = print,
) -> FeatureSet:  # fmt: skip
    """Features of ``shard_set`` by the route ``settings`` (``cfg.eval``) picks: in this
    process for a set of at most ``local_max_images`` (no GPU asked), else the Ray job."""
    small = shard_set.num_samples <= settings.local_max_images
    if small and not settings.use_gpu:
        say(f"[eval] features of {shard_set.num_samples:,} images in this process")
        return extract_local(shard_set, _built(network), batch_size=settings.batch_size,
                             keep=settings.keep_features, seed=seed)  # fmt: skip
    return extract_ray(shard_set, network, num_actors=settings.num_actors,
                       batch_size=settings.batch_size, use_gpu=settings.use_gpu,
                       keep=settings.keep_features, seed=seed, say=say)  # fmt: skip


@functools.lru_cache(maxsize=2)
def _built(network: NetworkSpec) -> FeatureNetwork:
    """The network, built once per process on CPU (every later set reuses it)."""
    return network.build("cpu")
