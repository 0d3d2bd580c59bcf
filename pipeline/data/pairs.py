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
from typing import Any

import numpy as np
import torch

from pipeline.data.manifest import MANIFEST_NAME, Manifest
from pipeline.storage import Location

__all__ = ["PairSet", "PairSetError", "open_pair_set", "read_pair_shard"]


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
