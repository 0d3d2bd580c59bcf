"""Reference statistics: a dataset split's features, computed once and reused.

Stored as one ``.npz`` (:meth:`FeatureSet.to_bytes`, no pickle) per (dataset content hash,
split, feature network key, resolution) at::

    <train.storage_path>/eval-reference/<content hash[:16]>-<split>-<network>-<R>px.npz

under the project's storage, never inside the dataset (which may be another team's,
read-only). The content hash changes whenever a shard does, so a rewritten dataset gets
new statistics and an old file is never used for new data.

Published statistics (``eval.reference_stats``) take the place of a split's: an ``.npz``
with ``mu`` (d,) and ``sigma`` (d, d), the format pytorch-fid, clean-fid, edm's
``fid-refs/*.npz`` and ADM's reference batches share, read with ``allow_pickle=False``
(edm2's ``.pkl`` files are pickles: save their ``mu``/``sigma`` with ``numpy.savez``
first). They carry no feature
rows, so only the Fréchet distance is computed against them. The figure is comparable
to a published FID only when the file was made with the same network (Inception-v3 of
2015-12-05, 2048-d) on the same images at the same resolution.
"""

from __future__ import annotations

import contextlib
import io
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config
from pipeline.eval.extract import (
    FeatureSet,
    NetworkSpec,
    ShardSet,
    dataset_shards,
    extract,
    network_dim,
)
from pipeline.eval.frechet import FeatureStats
from pipeline.home import storage_path
from pipeline.storage import Location, resolve

__all__ = [
    "PublishedStatsError",
    "Reference",
    "published_reference",
    "read_published_stats",
    "reference_features",
    "reference_location",
]

REFERENCE_DIR = "eval-reference"


@dataclass
class Reference:
    features: FeatureSet
    location: Location  # where the statistics are stored
    computed: bool  # False: read back from an earlier job (or published)


class PublishedStatsError(ValueError):
    """``eval.reference_stats`` names a file that is not usable statistics (bad input)."""


@contextlib.contextmanager
def _unreadable_as(where: str) -> Iterator[None]:
    """numpy's and zipfile's read errors as a PublishedStatsError naming ``where``."""
    try:
        yield
    except PublishedStatsError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        why = "it holds pickled objects" if "pickle" in str(exc) else type(exc).__name__
        raise PublishedStatsError(
            f"eval.reference_stats {where} is not an .npz of statistics ({why}: {exc})"
        ) from exc


@contextlib.contextmanager
def _opened_npz(data: bytes, where: str) -> Iterator[np.lib.npyio.NpzFile]:
    """The ``.npz`` in ``data``, opened once; PublishedStatsError naming ``where`` for
    anything else (a pickle above all: never loaded)."""
    if data[:1] == b"\x80":  # a pickle's PROTO opcode (edm2's .pkl statistics)
        raise PublishedStatsError(
            f"eval.reference_stats {where} is a pickle, which fmpipe never loads; save its "
            "mu and sigma as an .npz first: numpy.savez('ref.npz', mu=mu, sigma=sigma)"
        )
    with _unreadable_as(where):
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise PublishedStatsError(
            f"eval.reference_stats {where} is a single .npy array, not an .npz with mu (d,) "
            "and sigma (d, d)"
        )
    with loaded:
        yield loaded


def _mu_sigma(z: np.lib.npyio.NpzFile, where: str) -> FeatureStats:
    """``mu`` / ``sigma`` (and ``n`` where present; 0 = not stated) of an open ``.npz``."""
    names = sorted(z.files)
    if "mu" not in names or "sigma" not in names:
        raise PublishedStatsError(
            f"eval.reference_stats {where} has arrays {names}; statistics need mu (d,) and "
            "sigma (d, d), as pytorch-fid, clean-fid and ADM write them"
        )
    with _unreadable_as(where):  # an object array fails here, not at the listing
        mu, sigma = z["mu"], z["sigma"]
        n = int(z["n"]) if "n" in names and z["n"].shape == () else 0
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise PublishedStatsError(
            f"eval.reference_stats {where}: mu has shape {mu.shape} and sigma {sigma.shape}; "
            "they must be (d,) and (d, d)"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise PublishedStatsError(f"eval.reference_stats {where}: mu or sigma is not finite")
    return FeatureStats(n, mu, sigma)


def read_published_stats(data: bytes, where: str) -> FeatureStats:
    """``mu`` / ``sigma`` (and ``n`` where present; 0 = not stated) of an ``.npz``.

    Raises:
        PublishedStatsError: naming ``where``: not an ``.npz``, a pickle, arrays missing,
            wrong shapes or values that are not finite.
    """
    with _opened_npz(data, where) as z:
        return _mu_sigma(z, where)


def published_reference(
    cfg: Config, network: NetworkSpec, network_key: str, say: Callable[[str], None] = print
) -> Reference:
    """The :class:`Reference` of ``eval.reference_stats``: a published ``mu``/``sigma``
    file (no feature rows: FD only), or an fmpipe eval-reference file of ``network_key``
    (its rows too: every figure)."""
    where = resolve(cfg.eval.reference_stats.strip(), cfg.storage)
    if not where.exists():
        raise PublishedStatsError(f"eval.reference_stats {where.uri} does not exist")
    data = where.read_bytes()
    with _opened_npz(data, where.uri) as z:
        stats = None if "meta" in z.files else _mu_sigma(z, where.uri)  # meta: fmpipe's own
    if stats is None:
        try:
            features = FeatureSet.from_bytes(data, where.uri)
        except ValueError as exc:
            raise PublishedStatsError(f"eval.reference_stats: {exc}") from exc
        if features.network_key != network_key:
            raise PublishedStatsError(
                f"eval.reference_stats {where.uri} holds {features.network_key!r} features; "
                f"this evaluation uses {network_key!r}"
            )
        say(f"[eval] reference: {features.n:,} images' features from {where.uri}")
        return Reference(features, where, computed=False)
    d = network_dim(network)
    if stats.mean.shape[0] != d:
        raise PublishedStatsError(
            f"eval.reference_stats {where.uri} has {stats.mean.shape[0]}-d statistics; the "
            f"{network_key!r} network gives {d}-d features (FID's Inception: 2048)"
        )
    features = FeatureSet(
        network_key=network_key,
        stats=stats,
        kept=np.zeros((0, d), np.float32),
        labels=np.zeros(0, np.int64),
        meta={"published": where.uri},
    )
    counted = f"{stats.n:,} images" if stats.n else "image count not in the file"
    say(f"[eval] reference: published statistics {where.uri} ({d}-d, {counted}): FD only")
    return Reference(features, where, computed=False)


def reference_location(cfg: Config, shard_set: ShardSet, split: str, network_key: str) -> Location:
    """Where the statistics of ``split`` under ``network_key`` live (see module doc)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{split}-{network_key}")
    name = f"{shard_set.content_hash[:16]}-{safe}-{shard_set.spec.resolution}px.npz"
    return resolve(storage_path(cfg), cfg.storage).child(REFERENCE_DIR, name)


def reference_features(
    cfg: Config,
    network: NetworkSpec,
    network_key: str,
    *,
    split: str | None = None,
    say: Callable[[str], None] = print,
) -> Reference:
    """The reference :class:`FeatureSet` of ``split`` (default ``eval.reference_split``):
    read from storage, or computed (:func:`extract`: the Ray job, or this process for a
    small split) and stored; ``eval.reference_stats``, when set, instead
    (:func:`published_reference`)."""
    if cfg.eval.reference_stats.strip():
        return published_reference(cfg, network, network_key, say)
    split = split or cfg.eval.reference_split
    shard_set = dataset_shards(cfg, split)
    where = reference_location(cfg, shard_set, split, network_key)
    if where.exists():
        features = FeatureSet.from_bytes(where.read_bytes(), where.uri)
        if features.network_key == network_key:
            say(f"[eval] reference: {features.n:,} images of {shard_set.uri} from {where.uri}")
            return Reference(features, where, computed=False)
    say(f"[eval] reference: computing {network_key} features of {shard_set.uri}")
    features = extract(shard_set, network, cfg.eval, seed=cfg.seed, say=say)
    where.write_bytes(features.to_bytes())
    say(f"[eval] reference: {features.n:,} images -> {where.uri}")
    return Reference(features, where, computed=True)
