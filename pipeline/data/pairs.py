"""Coupled sample sets: what ``fmpipe sample --pairs`` wrote, read back as ``(x_0, x_1)``.

A coupled set is a sample output (:mod:`pipeline.sample`) written with ``sample.pairs``:
each sample's shard members hold its float32 ``x_1`` (``<key>.x1.npy``, the solver's state
at t = 1 before the 8-bit PNG) and its label (``.cls``); its ``x_0`` is not stored but
regenerated bit for bit from ``(seed, index)`` by the sampler's own
:func:`pipeline.sample.determinism.sample_noise`. So pair ``i`` is exactly the noise the
sampler integrated and the sample it reached: the deterministic coupling that reflow
trains on (:mod:`pipeline.flow.reflow`).

The set's ``_manifest.json`` (written last, so a set without one is incomplete) says which
model, solver, steps and seed produced it (``extra``); :class:`PairSet` carries those.
Members are parsed as bytes and ``.npy`` arrays loaded with ``allow_pickle=False``: no
pickle from data shards.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.storage import Location

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.flow.time_samplers import TimeSampler

__all__ = [
    "PairSet",
    "PairSetError",
    "PairStreamStage",
    "build_pairs_stream",
    "load_pairs_val_set",
    "open_pair_set",
    "pair_times",
    "read_pair_shard",
    "split_pair_shards",
]


class PairSetError(ValueError):
    """A location that is not a complete coupled sample set, or a shard that is not one."""


@dataclass(frozen=True)
class PairSet:
    """A complete coupled sample set: where it is and how it was made."""

    uri: str
    manifest: Manifest
    seed: int
    data_shape: tuple[int, ...]  # (C, H, W)
    num_classes: int

    @property
    def num_pairs(self) -> int:
        return self.manifest.num_samples

    @property
    def lineage(self) -> dict[str, Any]:
        """Which model and sampler made the pairs (for tags on what trains on them)."""
        extra = self.manifest.extra
        keys = ("model_uri", "model_name", "model_version", "model_digest", "solver", "steps")
        return {"pair_set": self.uri, "pair_seed": self.seed, **{k: extra.get(k) for k in keys}}


def open_pair_set(location: Location) -> PairSet:
    """The coupled set at ``location`` (its manifest read and checked).

    Raises:
        PairSetError: no manifest there (not a sample output, or one still being written),
            or a sample output written without ``sample.pairs``.
    """
    where = location.child(MANIFEST_NAME)
    if not where.exists():
        raise PairSetError(
            f"'{location.uri}' holds no {MANIFEST_NAME}: not a finished sample output (write "
            "one with fmpipe sample --pairs, or let the running job finish)"
        )
    manifest = Manifest.from_json(where.read_bytes().decode("utf-8"), where=where.uri)
    extra = manifest.extra
    if manifest.split != "samples" or not extra.get("pairs"):
        raise PairSetError(
            f"'{location.uri}' is not a coupled sample set: its samples were written without "
            "their float32 x_1 (sample them again with fmpipe sample --pairs)"
        )
    return PairSet(
        uri=location.uri,
        manifest=manifest,
        seed=int(extra["seed"]),
        data_shape=tuple(int(d) for d in extra["data_shape"]),
        num_classes=int(extra.get("num_classes") or 0),
    )


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:  # a pickled object array, a bad header
        raise PairSetError(f"{where}: not a plain .npy array ({exc})") from exc


def read_pair_shard(data: bytes, pair_set: PairSet, where: str) -> dict[str, torch.Tensor]:
    """The pairs of one shard, in index order: ``index`` int64 (n,), ``x_0`` and ``x_1``
    float32 (n, C, H, W), ``label`` int64 (n,) (-1 for an unconditional set).

    Raises:
        PairSetError: a sample without its ``.x1.npy``, or one of another shape.
    """
    from pipeline.sample.determinism import sample_noise
    from pipeline.sample.shards import X1_SUFFIX

    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                file = tar.extractfile(member)
                members.setdefault(key, {})[ext] = file.read() if file else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PairSetError(f"{where}: not a readable shard ({exc})") from exc
    ext = X1_SUFFIX.removeprefix(".")
    indices, x_1s, labels = [], [], []
    for key in sorted(members):
        parts = members[key]
        if ext not in parts:
            raise PairSetError(f"{where}: sample {key} has no {X1_SUFFIX}")
        x_1 = _load_npy(parts[ext], f"{where}: {key}{X1_SUFFIX}")
        if x_1.dtype != np.float32 or tuple(x_1.shape) != pair_set.data_shape:
            raise PairSetError(
                f"{where}: {key}{X1_SUFFIX} is {x_1.dtype} {tuple(x_1.shape)}, expected "
                f"float32 {pair_set.data_shape}"
            )
        indices.append(int(key))
        x_1s.append(x_1)
        labels.append(int(parts["cls"]) if "cls" in parts else -1)
    shape = pair_set.data_shape
    x_1 = torch.from_numpy(np.stack(x_1s)) if x_1s else torch.zeros((0, *shape))
    return {
        "index": torch.tensor(indices, dtype=torch.int64),
        "x_0": sample_noise(pair_set.seed, indices, shape),
        "x_1": x_1,
        "label": torch.tensor(labels, dtype=torch.int64),
    }


# --------------------------------------------------------------------------- training on pairs
def split_pair_shards(pair_set: PairSet) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """``(train, val)`` shards: with two or more shards the last (by name) is held out for
    the validation loss and never trained on; with one, everything trains and val is empty."""
    shards = sorted(pair_set.manifest.shards, key=lambda s: s.name)
    if len(shards) < 2:
        return shards, []
    return shards[:-1], shards[-1:]


def pair_times(
    keys: list[str], seed: int, epoch: int, sampler: TimeSampler, stream: str = "reflow-t"
) -> torch.Tensor:
    """``t`` (n,) of each pair in this epoch, from ``(seed, epoch, key)`` alone (as the image
    stream's draws): a pair's time never depends on batching, workers or order."""
    from pipeline.data.coupling import sample_generator

    if not keys:
        return torch.zeros(0)
    return torch.cat(
        [sampler.sample(1, generator=sample_generator(seed, epoch, k, stream)) for k in keys]
    )


def _read_checked(location: Location, shard: ShardInfo, pair_set: PairSet) -> dict[str, Tensor]:
    """One shard's pairs, its bytes checked against the set's manifest first."""
    from pipeline.data.stream import verify_shard

    where = location.child(shard.name)
    data = where.read_bytes()
    verify_shard(data, where.uri, shard.sha256)
    return read_pair_shard(data, pair_set, where.uri)


class PairStreamStage:
    """``map_batches`` callable (batch_size=1): an ``(epoch, shard)`` row -> that shard's
    pairs with this epoch's ``t``, in the columns of the image stream (``x_1``, ``x_0``
    float32, ``t``, ``label``, ``epoch``), so :class:`pipeline.train.data.RayDataSource`
    and the loop take them unchanged. No noise is drawn: ``x_0`` is the pair's own."""

    def __init__(self, cfg: Config, pair_set: PairSet) -> None:
        from pipeline.flow.time_samplers import build_time_sampler

        self.pair_set = pair_set
        self.seed = cfg.seed
        self.storage = cfg.storage.model_dump()
        f = cfg.flow
        self.sampler = build_time_sampler(f.time_sampler, f.logit_normal_mean, f.logit_normal_std)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.config import StorageConfig
        from pipeline.storage import resolve

        location = resolve(self.pair_set.uri, StorageConfig(**self.storage))
        (name,), (epoch,) = batch["name"], batch["epoch"]
        shard = next(s for s in self.pair_set.manifest.shards if s.name == name)
        pairs = _read_checked(location, shard, self.pair_set)
        keys = [f"{int(i):010d}" for i in pairs["index"]]
        return {
            "x_1": pairs["x_1"].numpy(),
            "x_0": pairs["x_0"].numpy(),
            "t": pair_times(keys, self.seed, int(epoch), self.sampler).numpy(),
            "label": pairs["label"].numpy(),
            "epoch": np.full(len(keys), int(epoch), dtype=np.int64),
        }


def build_pairs_stream(
    cfg: Config, pair_set: PairSet, shards: list[ShardInfo], start_epoch: int, num_epochs: int
) -> Any:
    """The lazy Ray Dataset of epochs ``[start_epoch, start_epoch + num_epochs)`` over
    ``shards`` of the set: one task per (epoch, shard), shards in the seeded order of
    :func:`pipeline.data.stream.shard_order` (``data.shuffle_shards``)."""
    import ray

    from pipeline.data.stream import shard_order, skip_task_memory_polling

    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    names = [s.name for s in shards]
    rows = [
        {"name": name, "epoch": epoch}
        for epoch in range(start_epoch, start_epoch + num_epochs)
        for name in shard_order(names, cfg.seed, epoch, cfg.data.shuffle_shards)
    ]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds.context.raise_original_map_exception = True  # as the image stream (stream.py)
    skip_task_memory_polling(ds)
    return ds.map_batches(PairStreamStage(cfg, pair_set), batch_size=1)


def load_pairs_val_set(cfg: Config, pair_set: PairSet, shards: list[ShardInfo], max_images: int):
    """The validation draws of a reflow run: the first ``max_images`` pairs of ``shards`` (the
    held-out ones) in index order, ``t`` from ``(seed, 0, key)`` on the ``"val"`` stream:
    the loss of the weights on the coupling they are meant to learn."""
    from pipeline.flow.time_samplers import UniformTimeSampler
    from pipeline.storage import resolve
    from pipeline.train.data import ValSet

    location = resolve(pair_set.uri, cfg.storage)
    parts = [_read_checked(location, shard, pair_set) for shard in shards]
    pairs = {key: torch.cat([p[key] for p in parts])[:max_images] for key in parts[0]}
    keys = [f"{int(i):010d}" for i in pairs["index"]]
    t = pair_times(keys, cfg.seed, 0, UniformTimeSampler(), stream="val")
    return ValSet(x_1=pairs["x_1"], x_0=pairs["x_0"], t=t, label=pairs["label"], keys=keys)
