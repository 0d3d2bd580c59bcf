"""Reference statistics: a dataset split's features, computed once and reused.

Stored as one ``.npz`` (:meth:`FeatureSet.to_bytes`, no pickle) per (dataset content hash,
split, feature network key, resolution) at::

    <train.storage_path>/eval-reference/<content hash[:16]>-<split>-<network>-<R>px.npz

under the project's storage, never inside the dataset (which may be another team's,
read-only). The content hash changes whenever a shard does, so a rewritten dataset gets
new statistics and an old file is never used for new data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.eval.extract import FeatureSet, NetworkSpec, ShardSet, dataset_shards, extract
from pipeline.home import storage_path
from pipeline.storage import Location, resolve

__all__ = ["Reference", "reference_features", "reference_location"]

REFERENCE_DIR = "eval-reference"


@dataclass
class Reference:
    features: FeatureSet
    location: Location  # where the statistics are stored
    computed: bool  # False: read back from an earlier job


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
    small split) and stored."""
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
