"""The index of a dataset fmpipe did not write: built in place, never written into it.

Users' WebDataset shards (``webdataset.ShardWriter``, img2dataset, HF exports, plain tar)
carry no ``_manifest.json``. :func:`build_index` reads each shard once, in parallel Ray
tasks, and records what a manifest would have said and more, per shard:

- where and which bytes: ``uri``, ``size``, ``etag`` (S3) or ``mtime_ns`` (local), and the
  ``sha256`` of the bytes (so a stream can verify integrity as it does for prepared data);
- samples: ``num_samples`` (keys found), ``num_ok`` (an image whose header decodes and a
  readable label), image extension counts, image ``modes`` counts, min/max width and
  height (from the headers, ``PIL.Image.open`` without ``load``), raw ``labels`` counts,
  ``unlabelled`` (good samples with no label);
- bad members: counts by kind (``no image``, ``undecodable image``, ``bad label``,
  ``duplicate key``, ``incomplete``, ``corrupt tar``) and the first ``data.index_bad_examples``
  ``{key, reason}`` pairs;
- ``split``: ``train`` or ``val``.

And for the dataset: the class names and the ``{raw label: id}`` map
(:func:`pipeline.data.labels.class_map`: integer labels keep their values, names are
sorted), the majority ``channels`` (1 when every image mode is grey: L, 1, I;16, LA,
else 3), resolution statistics, total samples per split, and a ``content_hash`` that changes
exactly when the data changes (sha256 over each shard's uri, size, ETag and sha256).

Incremental. Re-indexing lists the shards (one listing call per folder,
:mod:`pipeline.data.address`), reuses every entry of the previous index whose
``(uri, size, etag/mtime)`` is unchanged (and was read with the same label settings), and
reads only the new or changed shards; :class:`IndexResult` says how many of each.

Where it lives. ``data.index_uri`` when set, else ``$FMPIPE_HOME/indexes/<sha256 of the
address>[:16].json`` (:func:`pipeline.home.index_uri`). Never inside the dataset's own
folders: :func:`check_index_location` refuses it (:class:`IndexLocationError`), so the
user's data is only ever read. Written atomically (``Location.write_bytes``).

Validation split. ``data.val_uri`` (an address of its own), else with ``data.val_fraction``
> 0 whole shards carved out of the train address by a seeded hash of each shard's uri:
a shard's split depends on nothing but ``(seed, uri, fraction)``, so adding shards never
moves old ones between splits (:func:`carve_splits`: when the draws leave a split empty,
one stand-in shard fills it, and only a stand-in can move later).

Memory. The driver keeps per-shard aggregates only (no sample keys), at most a window of
tasks in flight; each task holds one shard's bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from PIL import Image

from pipeline.config import Config
from pipeline.data.address import (
    AddressError,
    ShardEntry,
    address_text,
    list_shards,
    source_roots,
)
from pipeline.data.decode import IMAGE_EXTENSIONS, BadSample
from pipeline.data.labels import LabelSpec, class_map, raw_label
from pipeline.data.stream import DatasetError, ShardStats, _iter_tar, image_member
from pipeline.storage import Location, StorageError, resolve

__all__ = [
    "GREY_MODES",
    "INDEX_FORMAT",
    "DatasetIndex",
    "IndexLocationError",
    "IndexResult",
    "ShardIndex",
    "assign_split",
    "build_index",
    "carve_splits",
    "check_index_location",
    "index_location",
    "index_shard_bytes",
    "load_index",
]

logger = logging.getLogger(__name__)

INDEX_FORMAT = "fmpipe-index/1"
GREY_MODES = frozenset({"1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I"})
_KIND = re.compile(r"[:(]")
_WINDOW = 64  # shard tasks in flight at most (driver memory: their results only)
_SHARDS_PER_TASK = 8  # at most, per Ray task (see _read_shards)


class IndexLocationError(DatasetError):
    """The index would be written inside the dataset's own folders (bad input, exit 2)."""


# --------------------------------------------------------------------------- records
@dataclass
class ShardIndex:
    """What one shard holds (see the module doc)."""

    uri: str
    size: int
    etag: str = ""
    mtime_ns: int = 0
    sha256: str = ""
    split: str = "train"
    num_samples: int = 0  # keys found, bad ones included
    num_ok: int = 0  # a decodable image header and a readable (or no) label
    image_exts: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    width_min: int = 0
    width_max: int = 0
    height_min: int = 0
    height_max: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # raw label -> samples (good ones)
    unlabelled: int = 0  # good samples without a label
    unlabelled_keys: list[str] = field(default_factory=list)  # the first few of them
    bad_counts: dict[str, int] = field(default_factory=dict)  # kind -> members
    bad: list[dict[str, str]] = field(default_factory=list)  # first {key, reason} pairs
    error: str = ""  # why the tar could not be read to its end
    label_source: str = "auto"  # the label settings it was read with
    label_field: str = "label"

    @property
    def version(self) -> str:
        return self.etag or str(self.mtime_ns)

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> ShardIndex:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})


@dataclass
class DatasetIndex:
    """The index file's body (``to_json`` / ``from_json``)."""

    address: str
    val_address: str = ""
    val_fraction: float = 0.0
    seed: int = 0
    label_source: str = "auto"
    label_field: str = "label"
    class_names: list[str] = field(default_factory=list)  # empty: unlabelled
    class_to_id: dict[str, int] = field(default_factory=dict)
    channels: int = 3
    resolution: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0  # usable samples, all splits
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> shards, samples
    bad_counts: dict[str, int] = field(default_factory=dict)
    content_hash: str = ""
    complete: bool = True  # False: some shards could not be read (listed in `unread`)
    unread: list[str] = field(default_factory=list)
    shards: list[ShardIndex] = field(default_factory=list)
    format: str = INDEX_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split_shards(self, split: str) -> list[ShardIndex]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "index") -> DatasetIndex:
        try:
            body = json.loads(text)
            if body.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {body.get('format')!r}, expected {INDEX_FORMAT!r}")
            body["shards"] = [ShardIndex.from_dict(s) for s in body.get("shards", [])]
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in body.items() if k in known})
        except (ValueError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{where} is not a valid fmpipe index: {exc}") from None


@dataclass
class IndexResult:
    """What :func:`build_index` did."""

    index: DatasetIndex
    uri: str  # where the index was written
    read: int  # shards read this time
    reused: int  # entries kept from the previous index


# --------------------------------------------------------------------------- one shard
def _kind(reason: str) -> str:
    return _KIND.split(reason, 1)[0].strip()


def index_shard_bytes(
    data: bytes,
    entry: ShardEntry,
    spec: LabelSpec,
    *,
    max_examples: int = 20,
) -> ShardIndex:
    """The :class:`ShardIndex` of one shard's bytes (pure: no I/O; ``split`` left "train")."""
    out = ShardIndex(
        uri=entry.uri,
        size=len(data),
        etag=entry.etag,
        mtime_ns=entry.mtime_ns,
        sha256=hashlib.sha256(data).hexdigest(),
        label_source=spec.source,
        label_field=spec.field,
    )
    stats = ShardStats(shard=entry.uri, declared=0)
    exts: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    widths: list[int] = [0, 0]  # min, max
    heights: list[int] = [0, 0]
    seen: set[str] = set()  # this shard's keys only, dropped when it returns

    def refuse(key: str, reason: str) -> None:
        bad[_kind(reason)] += 1
        if len(out.bad) < max_examples:
            out.bad.append({"key": key, "reason": reason})

    for sample in _iter_tar(data, stats):
        out.num_samples += 1
        try:
            ext = image_member(sample, seen, missing="no image")
            width, height, mode = _image_header(sample.members[ext], ext)
            label = raw_label(sample.members, spec)
        except BadSample as exc:
            refuse(sample.key, exc.reason)
            continue
        out.num_ok += 1
        exts[ext] += 1
        modes[mode] += 1
        for span, value in ((widths, width), (heights, height)):
            span[0] = value if out.num_ok == 1 else min(span[0], value)
            span[1] = max(span[1], value)
        if label is None:
            out.unlabelled += 1
            if len(out.unlabelled_keys) < max_examples:
                out.unlabelled_keys.append(sample.key)
        else:
            labels[label] += 1
    if stats.error:
        bad["corrupt tar"] += 1
        out.error = stats.error
        if len(out.bad) < max_examples:
            out.bad.append({"key": "", "reason": stats.error})
    out.image_exts, out.modes = dict(sorted(exts.items())), dict(sorted(modes.items()))
    out.labels, out.bad_counts = dict(sorted(labels.items())), dict(sorted(bad.items()))
    out.width_min, out.width_max = widths
    out.height_min, out.height_max = heights
    return out


def _image_header(data: bytes, ext: str) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the image's header; BadSample when it does not open."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: sizes are recorded
            with Image.open(io.BytesIO(data), formats=[IMAGE_EXTENSIONS[ext]]) as image:
                width, height = image.size
                return int(width), int(height), str(image.mode)
    except Exception as exc:  # UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise BadSample(f"undecodable image: .{ext}: {type(exc).__name__}: {exc}") from None


def _read_and_index(
    location: Location, entry: ShardEntry, spec: LabelSpec, max_examples: int
) -> dict[str, Any]:
    """Ray task body: read one shard whole, index it; a failed read is returned, not raised."""
    try:
        data = location.read_bytes()
    except Exception as exc:  # storage: transient or not, the driver decides
        return {"uri": entry.uri, "read_error": f"{type(exc).__name__}: {exc}"}
    if len(data) != entry.size:
        return {
            "uri": entry.uri,
            "read_error": f"size changed while indexing ({entry.size} listed, {len(data)} read)",
        }
    return asdict(index_shard_bytes(data, entry, spec, max_examples=max_examples))


def _read_and_index_many(
    work: list[tuple[Location, ShardEntry]], spec: LabelSpec, max_examples: int
) -> list[dict[str, Any]]:
    """Ray task body: :func:`_read_and_index` for a few shards, one after the other (a Ray
    task costs ~0.1 s of scheduling and process work on a small machine; a shard's index
    ~30 ms)."""
    return [_read_and_index(location, entry, spec, max_examples) for location, entry in work]


# --------------------------------------------------------------------------- placement
def index_location(cfg: Config, address: str) -> Location:
    """Where the index of ``address`` (canonical text) lives (see the module doc)."""
    from pipeline.home import index_uri

    return resolve(index_uri(cfg, address), cfg.storage)


def check_index_location(location: Location, entries: list[ShardEntry], address: str) -> None:
    """Refuse an index location inside any folder the dataset's shards live in."""
    for root in source_roots(entries):
        if location.uri == root or location.uri.startswith(root.rstrip("/") + "/"):
            raise IndexLocationError(
                f"index location {location.uri} is inside the dataset's own folder {root} "
                f"(address '{address}'): fmpipe never writes into a dataset it did not write; "
                "set data.index_uri (--index) elsewhere, or leave it empty for "
                "$FMPIPE_HOME/indexes/"
            )


def _split_draw(uri: str, seed: int) -> float:
    """A uniform draw in [0, 1) from ``(seed, uri)`` alone."""
    digest = hashlib.sha256(f"fmpipe-val|{seed}|{uri}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(uri: str, seed: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for one shard, from ``(seed, uri)`` alone."""
    if val_fraction <= 0:
        return "train"
    return "val" if _split_draw(uri, seed) < val_fraction else "train"


def carve_splits(uris: list[str], seed: int, val_fraction: float) -> dict[str, str]:
    """The split of every shard in ``uris``: :func:`assign_split`, never leaving a split empty.

    Each shard's draw ``u = hash(seed, uri)`` puts it in val when ``u < val_fraction``, so
    adding shards never moves old ones. With few shards the draws can leave val empty
    (10 shards at 0.3: 2.8% of seeds) or take every shard: then, with two or more shards,
    the lowest draw goes to val (or the highest to train): the one split a shard can
    leave when more shards arrive is such a stand-in.
    """
    splits = {uri: assign_split(uri, seed, val_fraction) for uri in uris}
    if val_fraction <= 0 or len(uris) < 2:
        return splits
    ordered = sorted(uris, key=lambda uri: _split_draw(uri, seed))
    if "val" not in splits.values():
        splits[ordered[0]] = "val"
    elif "train" not in splits.values():
        splits[ordered[-1]] = "train"
    return splits


def load_index(location: Location) -> DatasetIndex | None:
    """The index stored at ``location``, or None when there is none."""
    if not location.exists():
        return None
    return DatasetIndex.from_json(location.read_bytes().decode("utf-8"), where=location.uri)


# --------------------------------------------------------------------------- the build
def build_index(
    cfg: Config,
    *,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 2.0,
) -> IndexResult:
    """Index ``data.uri`` (and ``data.val_uri``) into ``data.index_uri`` or the home.

    Raises:
        AddressError: an empty address, a pattern matching nothing, a missing shard, or a
            shard in both the train and the val address.
        IndexLocationError: the index location is inside the dataset's folders.
        DatasetError: the previous index at the location is not a valid index.
        StorageError: storage failed (some shards unread: the index written so far marks
            them, and the next run reads only those).
    """
    say = progress or (lambda line: None)
    if not cfg.data.uri.strip():
        raise AddressError("data.uri is empty: give the dataset address (--data ADDRESS)")
    address = address_text(cfg.data.uri)
    val_address = address_text(cfg.data.val_uri) if cfg.data.val_uri.strip() else ""
    spec = LabelSpec.from_config(cfg)
    entries = list_shards(address, cfg.storage)
    val_entries = list_shards(val_address, cfg.storage) if val_address else []
    both = {e.uri for e in entries} & {e.uri for e in val_entries}
    if both:
        raise AddressError(
            f"shard {sorted(both)[0]} is in both the train address '{address}' and the val "
            f"address '{val_address}' ({len(both)} shard(s) in both)"
        )
    location = index_location(cfg, address)
    check_index_location(location, [*entries, *val_entries], address)
    splits = carve_splits([e.uri for e in entries], cfg.seed, cfg.data.val_fraction)
    if val_address:
        splits = {uri: "train" for uri in splits} | {e.uri: "val" for e in val_entries}
    everything = [*entries, *val_entries]
    say(
        f"index: {len(everything)} shard(s) at '{address}'"
        + (f" + val '{val_address}'" if val_address else "")
    )

    previous = _previous_entries(location, spec)
    kept: dict[str, ShardIndex] = {}
    todo: list[ShardEntry] = []
    for entry in everything:
        old = previous.get(entry.uri)
        if old is not None and old.size == entry.size and old.version == entry.version:
            kept[entry.uri] = old
        else:
            todo.append(entry)
    del previous
    if kept:
        say(f"index: reusing {len(kept)} unchanged shard(s), reading {len(todo)}")
    fresh, unread = _read_shards(cfg, todo, spec, say, progress_every_s)
    by_uri = kept | fresh
    shards = []
    for entry in everything:
        if entry.uri in by_uri:
            shard = by_uri[entry.uri]
            shard.split = splits[entry.uri]
            shards.append(shard)
    index = _aggregate(cfg, address, val_address, spec, shards)
    index.unread = sorted(unread)
    index.complete = not unread
    location.write_bytes(index.to_json().encode())
    if unread:
        first = sorted(unread.items())[0]
        raise StorageError(
            f"{len(unread)} of {len(everything)} shard(s) could not be read (e.g. {first[0]}: "
            f"{first[1]}); the {len(shards)} indexed are kept in {location.uri}: run the same "
            "command again to read the rest"
        )
    return IndexResult(index, location.uri, read=len(fresh), reused=len(kept))


def _previous_entries(location: Location, spec: LabelSpec) -> dict[str, ShardIndex]:
    try:
        old = load_index(location)
    except DatasetError as exc:
        logger.warning("index: %s; rebuilding it", exc)
        return {}
    if old is None:
        return {}
    return {
        s.uri: s
        for s in old.shards
        if s.label_source == spec.source and s.label_field == spec.field and s.sha256
    }


def _read_shards(
    cfg: Config,
    todo: list[ShardEntry],
    spec: LabelSpec,
    say: Callable[[str], None],
    every_s: float,
) -> tuple[dict[str, ShardIndex], dict[str, str]]:
    """Read the shards in parallel Ray tasks: ``({uri: entry}, {uri: read error})``."""
    if not todo:
        return {}, {}
    import ray

    from pipeline.rayenv import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(_read_and_index_many)
    spec_ref = ray.put(spec)
    # Shards per task: enough to amortise a task's cost, few enough that every CPU gets
    # several tasks (and the progress lines keep coming).
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(1, min(_SHARDS_PER_TASK, len(todo) // (4 * cpus)))
    pending: dict[Any, list[str]] = {}
    fresh: dict[str, ShardIndex] = {}
    unread: dict[str, str] = {}
    queue = list(reversed(todo))
    samples, last = 0, time.monotonic()
    while queue or pending:
        while queue and len(pending) < _WINDOW:
            batch = [queue.pop() for _ in range(min(per_task, len(queue)))]
            work = [(resolve(entry.uri, cfg.storage), entry) for entry in batch]
            ref = task.remote(work, spec_ref, cfg.data.index_bad_examples)
            pending[ref] = [entry.uri for entry in batch]
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pending.pop(ref)
            for body in ray.get(ref):
                uri = body["uri"]
                if "read_error" in body:
                    unread[uri] = body["read_error"]
                    continue
                shard = ShardIndex.from_dict(body)
                fresh[uri] = shard
                samples += shard.num_samples
        now = time.monotonic()
        if now - last >= every_s or not (queue or pending):
            last = now
            say(f"index: read {len(fresh) + len(unread)}/{len(todo)} shard(s), {samples:,} samples")
    return fresh, unread


def _aggregate(
    cfg: Config, address: str, val_address: str, spec: LabelSpec, shards: list[ShardIndex]
) -> DatasetIndex:
    labels: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    for shard in shards:
        labels.update(shard.labels)
        modes.update(shard.modes)
        bad.update(shard.bad_counts)
    names, to_id = class_map(labels)
    unlabelled = sum(s.unlabelled for s in shards)
    if to_id and unlabelled:  # a labelled dataset: a sample without a label is bad
        bad["bad label"] += unlabelled
    splits: dict[str, dict[str, int]] = {}
    for shard in shards:
        usable = shard.num_ok - (shard.unlabelled if to_id else 0)
        split = splits.setdefault(shard.split, {"shards": 0, "samples": 0})
        split["shards"] += 1
        split["samples"] += usable
    grey = bool(modes) and all(mode in GREY_MODES for mode in modes)
    images = [s for s in shards if s.num_ok]
    resolution: dict[str, float] = {}
    if images:
        resolution = {
            "width_min": min(s.width_min for s in images),
            "width_max": max(s.width_max for s in images),
            "height_min": min(s.height_min for s in images),
            "height_max": max(s.height_max for s in images),
        }
    digest = hashlib.sha256()
    for shard in sorted(shards, key=lambda s: s.uri):
        digest.update(f"{shard.uri}:{shard.size}:{shard.etag}:{shard.sha256}\n".encode())
    return DatasetIndex(
        address=address,
        val_address=val_address,
        val_fraction=0.0 if val_address else cfg.data.val_fraction,
        seed=cfg.seed,
        label_source=spec.source,
        label_field=spec.field,
        class_names=names,
        class_to_id=to_id,
        channels=1 if grey else 3,
        resolution=resolution,
        num_samples=sum(v["samples"] for v in splits.values()),
        splits=dict(sorted(splits.items())),
        bad_counts=dict(sorted(bad.items())),
        content_hash=digest.hexdigest(),
        shards=shards,
    )
