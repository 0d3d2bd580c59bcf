"""Datasets fmpipe did not write, as the training stream reads them: an index turned into a
:class:`~pipeline.data.stream.DatasetInfo`.

``data.uri`` names either a dataset root written by ``fmpipe prepare`` (``<root>/train/
_manifest.json`` exists) or a WebDataset address of another tool's shards (a folder or prefix
of ``.tar`` files, a brace pattern, a list; :mod:`pipeline.data.address`). For the latter,
:func:`open_foreign` builds or refreshes the dataset's index (:func:`pipeline.data.index.
build_index`: only new or changed shards are read, nothing is written under the source) and
describes one split of it exactly as a prepared split is described:

- one :class:`~pipeline.data.stream.ShardRef` per indexed shard of the split, its ``name``
  the shard's path below the shards' common folder (``location``), its ``sha256`` the digest
  the index computed, so the stream verifies every read as it does for prepared shards;
- a :class:`~pipeline.data.manifest.Manifest` summary: ``channels`` from the index (1 when
  every image is grey), ``class_names`` from the index, ``resolution`` the configured one (the
  decoder sizes every image by ``data.resize``; foreign images have no single size), and a
  ``content_hash`` that changes exactly when a shard is added or changes, which
  ``fmpipe retrain`` compares;
- ``labels``: the label settings and the index's ``{raw label: id}`` map, which the stream's
  decoder applies to each sample (``.cls`` ints or names, a ``.json`` field, a ``.txt`` name).
"""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING

from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.data.index import IndexResult
    from pipeline.data.stream import DatasetInfo
    from pipeline.storage import Location

__all__ = ["FOREIGN_FORMAT", "is_prepared", "open_foreign", "refresh_index"]

log = logging.getLogger(__name__)

FOREIGN_FORMAT = "webdataset"  # Manifest.format of a split described from an index

# One index per (process, address, settings) and run: train and val splits of one train()
# call share the build (keyed by what decides the index's content).
_BUILT: dict[tuple[str, ...], IndexResult] = {}


def _looks_like_shards(address: str) -> bool:
    text = address.strip()
    return "," in text or "{" in text or text.endswith(".tar")


def is_prepared(cfg: Config) -> bool:
    """Whether ``data.uri`` is a dataset root written by ``fmpipe prepare`` (or a path that
    does not exist at all, whose error says how to write one): anything else is another
    tool's WebDataset shards, read through an index."""
    from pipeline.storage import resolve

    address = cfg.data.uri
    if not address.strip() or _looks_like_shards(address):
        return not address.strip()
    root = resolve(address, cfg.storage)
    if any(root.child(split, MANIFEST_NAME).exists() for split in ("train", "val")):
        return True
    return not root.exists()


def _key(cfg: Config) -> tuple[str, ...]:
    d = cfg.data
    return (
        d.uri, d.val_uri, d.index_uri, d.label_source, d.label_field,
        str(d.val_fraction), str(cfg.seed),
    )  # fmt: skip


def refresh_index(cfg: Config, *, fresh: bool = True) -> IndexResult:
    """Build or refresh the index of ``data.uri`` (reads only new or changed shards).

    ``fresh=False`` reuses this process's last build for the same settings (the val split
    of a run opened right after its train split)."""
    from pipeline.data.index import build_index

    key = _key(cfg)
    if not fresh and key in _BUILT:
        return _BUILT[key]
    result = build_index(cfg, progress=lambda line: log.info("%s", line))
    _BUILT[key] = result
    log.info(
        "index of '%s' at %s: %d shard(s) read, %d reused, %d usable samples",
        cfg.data.uri, result.uri, result.read, result.reused, result.index.num_samples,
    )  # fmt: skip
    return result


def _common_folder(uris: list[str]) -> str:
    """The longest folder (``/``-separated) that holds every one of ``uris``."""
    folders = [uri.rsplit("/", 1)[0] for uri in uris]
    common = posixpath.commonpath([f.replace("://", ":/") for f in folders])
    return common.replace(":/", "://", 1) if "://" in folders[0] else common


def open_foreign(cfg: Config, split: str, *, fresh: bool = True) -> DatasetInfo:
    """Split ``split`` of the foreign dataset ``data.uri``, from its (refreshed) index.

    Raises:
        DatasetError: no shard of that split (e.g. ``val`` without ``data.val_uri`` or
            ``data.val_fraction``), no usable sample in it; the index's own errors
            (:class:`~pipeline.data.address.AddressError`, a location inside the data).
        StorageError: the store cannot be listed or read.
    """
    from pipeline.data.stream import DatasetError, DatasetInfo, ShardRef
    from pipeline.storage import resolve

    result = refresh_index(cfg, fresh=fresh)
    index = result.index
    shards = index.split_shards(split)
    if not shards:
        how = (
            "give one with data.val_uri=ADDRESS or carve one out with data.val_fraction=F"
            if split == "val"
            else "the address holds no shard of this split"
        )
        raise DatasetError(f"dataset '{cfg.data.uri}' has no '{split}' split: {how}")
    usable = sum(shard.num_ok for shard in shards)
    if usable == 0:
        raise DatasetError(
            f"dataset '{cfg.data.uri}' split '{split}' has no usable sample in "
            f"{len(shards)} shard(s) (index {result.uri}: bad members {index.bad_counts})"
        )
    root = _common_folder([shard.uri for shard in shards])
    if root.rstrip("/:") in ("s3", "s3:/", ""):
        raise DatasetError(
            f"dataset '{cfg.data.uri}': its shards lie in more than one bucket; one dataset's "
            "shards must share a bucket (or a local folder tree)"
        )
    location: Location = resolve(root, cfg.storage)
    refs, infos = [], []
    for shard in shards:
        name = shard.uri[len(root) :].lstrip("/")
        where = location.child(name)
        refs.append(ShardRef(name, where.path, where.uri, shard.num_samples, shard.sha256))
        infos.append(ShardInfo(name=name, num_samples=shard.num_samples, sha256=shard.sha256))
    manifest = Manifest(
        split=split,
        resolution=cfg.data.resolution,
        channels=index.channels,
        image_format="mixed",
        class_names=list(index.class_names),
        shards=infos,
        source=f"index:{result.uri}",
        extra={
            "address": index.address,
            "content_hash": index.content_hash,
            "image_sizes": dict(index.resolution),  # width/height min/max over the images
        },
        format=FOREIGN_FORMAT,
    )
    return DatasetInfo(
        uri=cfg.data.uri,
        split=split,
        location=location,
        manifest=manifest,
        shards=refs,
        class_to_id=dict(index.class_to_id),
        usable_samples=usable,
    )
