"""``fmpipe prepare``: an image source -> WebDataset shards + ``_manifest.json`` per split.

Layout written under the output root (``s3://bucket/prefix`` or a local path)::

    <root>/train/shard-000000.tar ... _manifest.json
    <root>/val/shard-000000.tar ... _manifest.json

What it guarantees:

- The train/val split is a seeded permutation of the source's indices (``seed``; the val
  split gets ``round(val_fraction * N)`` samples); shards hold ``shard_size`` consecutive
  samples of that permutation (so classes mix), members sorted by key.
- Output access is checked before any work: a missing bucket, rejected credentials or an
  unwritable directory fail at once, with a message naming the URI.
- Shards are written atomically (an object appears under its final name only when
  complete); large ones go up streamed from a temp file, as multipart uploads.
- Re-running skips every shard whose recipe (source fingerprint, indices, settings) is
  unchanged and whose object still exists with the recorded size and sha256 (read back
  and hashed); anything else (a deleted or corrupted shard, a changed setting) is
  rebuilt. A run that changes nothing writes nothing, not even the manifests. Shards are
  recorded by the manifests and, while a run goes on, by ``<root>/_prepare_progress.json``
  (deleted at the end), so re-running an interrupted run also skips what it finished.
- Each split's manifest is written (atomically) after all shards are in place, and only
  when its content changed; shards of an earlier run that the new manifest no longer
  lists are then deleted.
- With more than ``parallel_threshold`` samples to build, shards are built by Ray tasks
  (one per shard, ``num_cpus=1``), each loading only its own indices from the source and
  writing its shard itself; otherwise in this process, with no Ray start-up cost. Both
  paths give byte-identical shards. (Ray is started locally unless already initialised
  or ``RAY_ADDRESS`` points at a cluster; a ``folder:`` source must then be visible at the
  same path on every node.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.data.manifest import MANIFEST_NAME, SPLITS, Manifest, ShardInfo, shard_name
from pipeline.data.shards import (
    ShardBuild,
    build_shard,
    estimate_shard_bytes,
    key_width,
    write_shard,
)
from pipeline.data.sources import Source, build_source, default_dataset_name, parse_source_spec
from pipeline.home import prepare_out
from pipeline.rayenv import ensure_ray
from pipeline.storage import (
    MULTIPART_THRESHOLD,
    Location,
    StorageError,
    StorageInputError,
    check_access,
    resolve,
)

PREPARE_VERSION = 1  # bump when the shard contents change for the same recipe
# Shards that may exceed this are built in a local temp file and streamed up from there
# (S3: a multipart upload above storage.MULTIPART_THRESHOLD); smaller ones are built in memory.
STREAM_THRESHOLD = MULTIPART_THRESHOLD
PROGRESS_NAME = "_prepare_progress.json"  # finished shards of a run still going (or interrupted)
PROGRESS_EVERY_S = 10.0  # how often that record is rewritten while shards are being built
_READ_CHUNK = 8 * 1024**2

Log = Callable[[str], None]


@dataclass
class SplitResult:
    """One split of a prepared dataset."""

    split: str  # "train" | "val"
    uri: str  # the split's directory
    num_samples: int  # samples listed in the manifest
    num_shards: int  # shards listed in the manifest
    written: int  # shards built and written by this run
    skipped: int  # shards already in place with the right checksum
    bytes_written: int  # bytes of the shards written by this run
    deleted: int = 0  # stale shards of an earlier run removed
    manifest_written: bool = False  # False when the manifest was already up to date


@dataclass
class PrepareResult:
    """What ``prepare_dataset`` did."""

    out: str  # dataset root URI
    source: str  # source name, e.g. "digits"
    splits: dict[str, SplitResult]
    wall_seconds: float
    parallel: bool  # shards built by Ray tasks
    source_samples: int  # samples the source offered
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, why) left out
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why): source's own

    @property
    def num_samples(self) -> int:
        return sum(split.num_samples for split in self.splits.values())

    @property
    def shards_written(self) -> int:
        return sum(split.written for split in self.splits.values())

    @property
    def shards_skipped(self) -> int:
        return sum(split.skipped for split in self.splits.values())

    def summary(self) -> str:
        rate = self.num_samples / self.wall_seconds if self.wall_seconds > 0 else 0.0
        how = "Ray tasks" if self.parallel else "in process"
        lines = [
            f"prepared {self.source} -> {self.out}: {self.num_samples:,} samples in "
            f"{self.wall_seconds:.1f} s ({rate:,.0f} samples/s, {how})"
        ]
        for split in self.splits.values():
            noun = "shard" if split.num_shards == 1 else "shards"
            extra = f", {split.deleted} stale deleted" if split.deleted else ""
            lines.append(
                f"  {split.split:<5} {split.num_samples:>9,} samples in {split.num_shards:,} "
                f"{noun} ({split.written} written, {split.skipped} skipped{extra}) "
                f"at {split.uri}"
            )
        if self.unreadable:
            lines.append(
                f"  {len(self.unreadable):,} unreadable files left out "
                f"({_reasons(why for _, why in self.unreadable)})"
            )
        if self.skipped:
            lines.append(
                f"  {len(self.skipped):,} skipped by the source "
                f"({_reasons(why for _, why in self.skipped)})"
            )
        return "\n".join(lines)


def _reasons(whys: Iterable[str]) -> str:
    """``"3 undecodable .png, 1 not an image"``: reason kinds by count, most first."""
    from collections import Counter

    kinds = Counter()
    for why in whys:
        text = why.removeprefix("BadSample: ")
        kinds[text.split(":", 1)[0].split(" (", 1)[0].strip() or text] += 1
    return ", ".join(f"{n:,} {kind}" for kind, n in kinds.most_common())


# -- split + recipes -------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """``{"train": ..., "val": ...}``: a seeded permutation of ``range(n)`` cut in two.

    The permutation orders indices by a 64-bit hash of ``(seed, index)`` (splitmix64), so it
    is the same on every machine and library version. The val split gets the first
    ``round(val_fraction * n)`` indices (never all of them when n > 1), train the rest.
    """
    seed_word = np.array([seed % 2**64], dtype=np.uint64)
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        base = _mix64(seed_word + golden)[0]
        keys = _mix64(base + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * golden)
    order = np.argsort(keys, kind="stable").astype(np.int64)
    num_val = round(val_fraction * n)
    if n > 1:
        num_val = min(num_val, n - 1)
    return {"train": order[num_val:], "val": order[:num_val]}


@dataclass(frozen=True)
class ShardSettings:
    """How samples are stored: the same for every shard of a dataset."""

    resolution: int
    channels: int
    image_format: str
    width: int  # key width

    def as_kwargs(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "channels": self.channels,
            "image_format": self.image_format,
            "width": self.width,
        }


@dataclass(frozen=True)
class ShardJob:
    """One shard to make: where its samples come from and what a previous run recorded."""

    split: str
    number: int  # shard number inside the split
    indices: np.ndarray  # global sample indices (in permutation order)
    recipe: str  # sha256 of everything the shard's bytes depend on
    previous: dict[str, Any] | None = None  # record of an earlier run with the same recipe

    @property
    def name(self) -> str:
        return shard_name(self.number)


@dataclass
class ShardOutcome:
    split: str
    number: int
    info: ShardInfo | None  # None: no readable sample, nothing written
    size: int
    recipe: str
    written: bool
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return shard_name(self.number)


def shard_recipe(source: Source, split: str, indices: np.ndarray, settings: ShardSettings) -> str:
    digest = hashlib.sha256()
    head = {
        "version": PREPARE_VERSION,
        "source": source.fingerprint(indices.tolist()),
        "split": split,
        **settings.as_kwargs(),
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(indices, dtype="<i8").tobytes())
    return digest.hexdigest()


# -- one shard (in process or in a Ray task) -------------------------------------------


def _object_matches(target: Location, sha256: str, size: int) -> bool:
    """True when ``target`` exists with ``size`` bytes whose sha256 is ``sha256``."""
    try:
        if target.size() != size:
            return False
        digest = hashlib.sha256()
        with target.filesystem.open_input_stream(target.path) as stream:
            while chunk := stream.read(_READ_CHUNK):
                digest.update(chunk)
        return digest.hexdigest() == sha256
    except (StorageError, OSError):
        return False


def process_shard(
    source: Source, job: ShardJob, split_dir: Location, settings: ShardSettings
) -> ShardOutcome:
    """Skip the shard when it is already in place, else build it and write it atomically."""
    target = split_dir.child(job.name)
    if job.previous and _object_matches(target, job.previous["sha256"], job.previous["size"]):
        return _skipped(job)
    kwargs = {"split": job.split, **settings.as_kwargs()}
    build: ShardBuild
    estimate = estimate_shard_bytes(len(job.indices), settings.resolution, settings.channels)
    if estimate > STREAM_THRESHOLD:
        # Large shard: built on local disk, then streamed up (multipart on S3).
        with tempfile.TemporaryDirectory(prefix="fmpipe-shard-") as tmp:
            path = Path(tmp) / job.name
            with path.open("wb") as out:
                build = write_shard(out, source, job.indices, **kwargs)
            if build.num_samples:
                target.upload_file(path)
    else:
        data, build = build_shard(source, job.indices, **kwargs)
        if build.num_samples:
            target.write_bytes(data)
    if not build.num_samples:
        return ShardOutcome(
            job.split, job.number, None, 0, job.recipe, False, list(build.unreadable)
        )
    info = ShardInfo(
        name=job.name,
        num_samples=build.num_samples,
        sha256=build.sha256,
        first_key=build.first_key,
    )
    return ShardOutcome(
        job.split, job.number, info, build.size, job.recipe, True, list(build.unreadable)
    )


def _skipped(job: ShardJob) -> ShardOutcome:
    """The outcome of a shard already in place, from the record of the run that wrote it."""
    previous = job.previous or {}
    info = ShardInfo(
        name=job.name,
        num_samples=int(previous["num_samples"]),
        sha256=previous["sha256"],
        first_key=previous["first_key"],
    )
    unreadable = [(str(what), str(why)) for what, why in previous.get("unreadable", [])]
    return ShardOutcome(
        job.split, job.number, info, int(previous["size"]), job.recipe, False, unreadable
    )


def _record(outcome: ShardOutcome) -> dict[str, Any]:
    """What a later run needs to skip this shard (stored in the manifest / progress file)."""
    info = outcome.info
    assert info is not None
    return {
        "recipe": outcome.recipe,
        "size": outcome.size,
        "sha256": info.sha256,
        "num_samples": info.num_samples,
        "first_key": info.first_key,
        "unreadable": [list(item) for item in outcome.unreadable],
    }


def _split_done_jobs(
    jobs: list[ShardJob], split_dirs: dict[str, Location]
) -> tuple[list[ShardOutcome], list[ShardJob]]:
    """(outcomes of shards already in place, jobs left to build), checked with 8 threads.

    A shard is in place when a previous run recorded it with the same recipe and the object
    exists with the recorded size and sha256 (read back and hashed here).
    """

    def in_place(job: ShardJob) -> bool:
        if not job.previous:
            return False
        target = split_dirs[job.split].child(job.name)
        return _object_matches(target, job.previous["sha256"], int(job.previous["size"]))

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(in_place, jobs))
    done = [_skipped(job) for job, ok in zip(jobs, found, strict=True) if ok]
    todo = [replace(job, previous=None) for job, ok in zip(jobs, found, strict=True) if not ok]
    return done, todo


class _Checkpoint:
    """``<root>/_prepare_progress.json``: the shards finished so far, written while a run goes
    on (at most every ``every`` seconds, only when something new was written) and deleted
    when the manifests are in place, so that re-running an interrupted run skips them."""

    def __init__(self, location: Location, every: float) -> None:
        self.location, self.every = location, every
        self.records: dict[str, dict[str, Any]] = {}
        self.dirty = False
        self.last = time.perf_counter()

    def add(self, outcome: ShardOutcome) -> None:
        if outcome.info is None:
            return
        self.records[f"{outcome.split}/{outcome.name}"] = _record(outcome)
        if outcome.written:
            self.dirty = True
            if time.perf_counter() - self.last >= self.every:
                self.flush()

    def flush(self) -> None:
        if self.dirty:
            body = {"version": PREPARE_VERSION, "shards": self.records}
            self.location.write_bytes(json.dumps(body, sort_keys=True).encode())
            self.dirty = False
        self.last = time.perf_counter()

    def remove(self) -> None:
        if self.location.exists():
            self.location.delete()


def _read_progress(location: Location) -> dict[str, dict[str, Any]]:
    """Records of an interrupted run: ``{"train/shard-000003.tar": record}``."""
    if not location.exists():
        return {}
    try:
        body = json.loads(location.read_bytes())
        records = body["shards"] if body.get("version") == PREPARE_VERSION else {}
        return {k: v for k, v in records.items() if isinstance(v, dict) and _complete(v)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _complete(record: dict[str, Any]) -> bool:
    keys = {"recipe", "size", "sha256", "num_samples", "first_key"}
    return keys <= record.keys()


# -- runners ---------------------------------------------------------------------------


def _run_in_process(
    source: Source,
    jobs: list[ShardJob],
    split_dirs: dict[str, Location],
    settings: ShardSettings,
) -> Iterator[ShardOutcome]:
    for job in jobs:
        yield process_shard(source, job, split_dirs[job.split], settings)


def _run_ray(
    source: Source,
    jobs: list[ShardJob],
    split_dirs: dict[str, Location],
    settings: ShardSettings,
) -> Iterator[ShardOutcome]:
    """One Ray task per shard (num_cpus=1); the source travels once, through the object store."""
    import ray
    from ray.exceptions import RayTaskError

    started = ensure_ray()
    try:
        task = ray.remote(num_cpus=1)(process_shard)
        source_ref = ray.put(source)
        pending = {
            task.remote(source_ref, job, split_dirs[job.split], settings): job for job in jobs
        }
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    pending.pop(ref)
                    try:
                        yield ray.get(ref)
                    except RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, Exception):
                            raise cause from None
                        raise
        finally:
            for ref in pending:
                ray.cancel(ref)
    finally:
        if started:
            ray.shutdown()


class _Progress:
    """Prints ``shards built / total`` about every 5% or 5 s."""

    def __init__(self, total: int, log: Log) -> None:
        self.total, self.log = total, log
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.step = max(1, total // 20)

    def update(self, outcome: ShardOutcome) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.done == self.total or self.done % self.step == 0 or now - self.last >= 5.0:
            self.last = now
            self.log(f"  shards {self.done}/{self.total} built ({now - self.start:.1f} s)")


# -- the job ---------------------------------------------------------------------------


def _read_manifest(location: Location, log: Log) -> tuple[Manifest | None, str]:
    """The manifest at ``location`` and its text; (None, "") when missing or invalid."""
    if not location.exists():
        return None, ""
    text = location.read_bytes().decode("utf-8", errors="replace")
    try:
        return Manifest.from_json(text, where=location.uri), text
    except ValueError as exc:
        log(f"warning: ignoring the existing manifest: {exc}")
        return None, text


def _previous_records(manifest: Manifest | None) -> dict[str, dict[str, Any]]:
    """``{shard name: record}`` of an earlier run: sha256, size, samples, recipe, ..."""
    if manifest is None:
        return {}
    records = manifest.extra.get("shard_records", {})
    if not isinstance(records, dict):
        return {}
    found = {}
    for shard in manifest.shards:
        record = records.get(shard.name)
        if isinstance(record, dict) and {"recipe", "size"} <= record.keys():
            found[shard.name] = {
                "unreadable": [],
                **record,
                "sha256": shard.sha256,
                "num_samples": shard.num_samples,
                "first_key": shard.first_key,
            }
    return found


def output_location(cfg: Config) -> Location:
    """Where ``cfg`` writes: ``prepare.out``, else ``$FMPIPE_HOME/store/<dataset name>``."""
    return resolve(prepare_out(cfg, default_dataset_name(cfg.prepare.source)), cfg.storage)


def refuse_foreign_output(root: Location) -> None:
    """Refuse an output root that holds files fmpipe's prepare did not write.

    fmpipe's own output (re-run and repaired in place) is ``train/`` and ``val/`` with a
    ``_manifest.json`` and ``shard-NNNNNN.tar`` files, and ``_prepare_progress.json``. A
    root holding anything else (another tool's ``.tar`` shards, a split folder with shards
    but no manifest, any other file) is someone else's data: StorageInputError, before
    anything is written.
    """
    import re

    from pyarrow import fs as pafs

    selector = pafs.FileSelector(root.path, recursive=True, allow_not_found=True)
    try:
        infos = root.filesystem.get_file_info(selector)
    except (OSError, ValueError):
        return  # not a folder (or not listable): check_access and the writes say why
    base = root.path.rstrip("/") + "/"
    shard = re.compile(r"^shard-\d{6}\.tar$")
    files = [
        info.path[len(base) :]
        for info in infos
        if info.type == pafs.FileType.File and info.path.startswith(base)
    ]
    manifests = {split for split in SPLITS if f"{split}/{MANIFEST_NAME}" in files}
    progress = PROGRESS_NAME in files
    foreign = []
    for rel in files:
        head, _, name = rel.partition("/")
        if rel == PROGRESS_NAME or name.startswith(".fmpipe-tmp") or head.startswith("."):
            continue
        if (
            head in SPLITS
            and "/" not in name
            and (name == MANIFEST_NAME or (shard.match(name) and (head in manifests or progress)))
        ):
            continue
        foreign.append(rel)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise StorageInputError(
            f"prepare output '{root.uri}' holds {len(foreign):,} files fmpipe did not write "
            f"({shown}): it will not write into another tool's data; choose another --out "
            f"(to train on those shards as they are: fmpipe index --data {root.uri})"
        )


def prepare_dataset(cfg: Config, log: Log | None = print) -> PrepareResult:
    """Write the train/val shards and manifests of ``cfg.prepare`` (see the module docs).

    Raises ValueError for a bad source (unknown spec, empty folder, nothing readable) and
    StorageError when the output cannot be used; both before any shard is written.
    """
    say: Log = log or (lambda _message: None)
    start = time.perf_counter()
    pcfg = cfg.prepare
    parse_source_spec(pcfg.source)  # a bad spec fails before storage is touched
    root = output_location(cfg)
    check_access(root, must_exist=False)  # a missing bucket / bad credentials: fail now
    refuse_foreign_output(root)  # never write into another tool's data
    source = build_source(pcfg.source, pcfg, cfg.seed, cfg)
    for uri in getattr(source, "shard_uris", [])[:1] and sorted(
        {u.rpartition("/")[0] for u in source.shard_uris}  # type: ignore[attr-defined]
    ):
        if root.uri == uri or root.uri.startswith(uri + "/"):
            raise StorageInputError(
                f"prepare output '{root.uri}' is inside the source's shards folder '{uri}': "
                "it will not write into another tool's data; choose another --out"
            )
    n = len(source)
    ignored = getattr(source, "ignored_top_level", 0)
    if ignored:
        say(f"warning: {ignored} images beside the class folders of {source.name}: left out")
    skipped: list[tuple[str, str]] = list(getattr(source, "skipped", []))
    if skipped:
        kinds = _reasons(why for _, why in skipped)
        say(f"warning: {len(skipped):,} items of {source.name} skipped ({kinds}):")
        for what, why in skipped[:20]:
            say(f"  {what}: {why}")
        if len(skipped) > 20:
            say(f"  ... and {len(skipped) - 20:,} more")
    channels = source.channels or pcfg.channels  # webdataset: the images' when unset
    if channels != pcfg.channels:
        say(f"channels: {channels}, from the images of {source.name} (prepare.channels unset)")
    settings = ShardSettings(pcfg.resolution, channels, pcfg.image_format, key_width(n))
    splits = split_indices(n, pcfg.val_fraction, cfg.seed)
    split_dirs = {split: root.child(split) for split in SPLITS}
    old_manifests = {
        split: _read_manifest(split_dirs[split].child(MANIFEST_NAME), say) for split in SPLITS
    }

    progress_loc = root.child(PROGRESS_NAME)
    interrupted = _read_progress(progress_loc)
    jobs: list[ShardJob] = []
    for split in SPLITS:
        previous = _previous_records(old_manifests[split][0])
        indices = splits[split]
        for number, begin in enumerate(range(0, len(indices), pcfg.shard_size)):
            chunk = indices[begin : begin + pcfg.shard_size]
            recipe = shard_recipe(source, split, chunk, settings)
            name = shard_name(number)
            reuse = None
            for record in (interrupted.get(f"{split}/{name}"), previous.get(name)):
                if record and record["recipe"] == recipe:
                    reuse = record
                    break
            jobs.append(ShardJob(split, number, chunk, recipe, reuse))

    sizes = ", ".join(f"{split} {len(splits[split]):,}" for split in SPLITS)
    say(f"preparing {source.name} ({n:,} samples: {sizes}) -> {root.uri}: {len(jobs)} shards")
    outcomes, todo = _split_done_jobs(jobs, split_dirs)
    to_build = sum(len(job.indices) for job in todo)
    parallel = to_build > pcfg.parallel_threshold
    if outcomes:
        say(f"  {len(outcomes)} shards already in place (sha256 matches): skipped")
    if todo:
        how = "Ray tasks, one per shard" if parallel else "in process"
        say(f"  building {len(todo)} shards ({to_build:,} samples, {how})")
    checkpoint = _Checkpoint(progress_loc, PROGRESS_EVERY_S)
    for outcome in outcomes:
        checkpoint.add(outcome)
    runner = _run_ray if parallel else _run_in_process
    progress = _Progress(len(todo), say)
    try:
        for outcome in runner(source, todo, split_dirs, settings) if todo else ():
            outcomes.append(outcome)
            progress.update(outcome)
            checkpoint.add(outcome)
        results = _finish(cfg, source, outcomes, split_dirs, old_manifests, settings, say)
    except BaseException:
        # an interrupted or failed run leaves its finished shards on record for the next
        with contextlib.suppress(Exception):
            checkpoint.flush()
        raise
    checkpoint.remove()
    unreadable = [item for outcome in outcomes for item in outcome.unreadable]
    for result in results.values():
        if result.deleted:
            say(f"  {result.split}: deleted {result.deleted} stale shards of an earlier run")
    result = PrepareResult(
        out=root.uri,
        source=source.name,
        splits=results,
        wall_seconds=time.perf_counter() - start,
        parallel=parallel,
        source_samples=n,
        unreadable=unreadable,
        skipped=skipped,
    )
    say(result.summary())
    return result


def _finish(
    cfg: Config,
    source: Source,
    outcomes: list[ShardOutcome],
    split_dirs: dict[str, Location],
    old_manifests: dict[str, tuple[Manifest | None, str]],
    settings: ShardSettings,
    say: Log,
) -> dict[str, SplitResult]:
    """Check that something was readable, then write each split's manifest."""
    n, pcfg = len(source), cfg.prepare
    unreadable = [item for outcome in outcomes for item in outcome.unreadable]
    if unreadable:
        _report_unreadable(unreadable, n, say)
        if all(outcome.info is None for outcome in outcomes):
            what = getattr(source, "root", source.name)
            first, why = unreadable[0]
            raise ValueError(
                f"none of the {n:,} images of {what} could be read (e.g. {first}: {why})"
            )

    return {
        split: _finish_split(
            split,
            [o for o in outcomes if o.split == split],
            split_dirs[split],
            old_manifests[split][1],
            source,
            settings,
            extra={
                "seed": cfg.seed,
                "val_fraction": pcfg.val_fraction,
                "shard_size": pcfg.shard_size,
                "source_samples": n,
                "key_width": settings.width,
            },
        )
        for split in SPLITS
    }


def _report_unreadable(unreadable: list[tuple[str, str]], total: int, say: Log) -> None:
    say(f"warning: {len(unreadable):,} of {total:,} images could not be read and are left out:")
    for what, why in unreadable[:20]:
        say(f"  {what}: {why}")
    if len(unreadable) > 20:
        say(f"  ... and {len(unreadable) - 20:,} more")


def _finish_split(
    split: str,
    outcomes: Iterable[ShardOutcome],
    split_dir: Location,
    old_text: str,
    source: Source,
    settings: ShardSettings,
    extra: dict[str, Any],
) -> SplitResult:
    """Write the split's manifest (unless unchanged) and delete shards it no longer lists."""
    done = sorted(outcomes, key=lambda o: o.number)
    listed = [o for o in done if o.info is not None]
    records = {
        o.name: {
            key: value
            for key, value in _record(o).items()
            if key not in ("sha256", "num_samples", "first_key")  # in the shard list already
        }
        for o in listed
    }
    manifest = Manifest(
        split=split,
        resolution=settings.resolution,
        channels=settings.channels,
        image_format=settings.image_format,
        class_names=list(source.class_names),
        shards=[o.info for o in listed if o.info is not None],
        source=source.name,
        extra={
            **extra,
            "unreadable": sum(len(o.unreadable) for o in done),
            "shard_records": records,
        },
    )
    text = manifest.to_json()
    manifest_loc = split_dir.child(MANIFEST_NAME)
    manifest_written = old_text != text
    if manifest_written:
        manifest_loc.write_bytes(text.encode("utf-8"))
    keep = {o.name for o in listed}
    deleted = 0
    for name in split_dir.list_names(suffix=".tar"):
        if name.startswith("shard-") and name not in keep:
            split_dir.child(name).delete()
            deleted += 1
    return SplitResult(
        split=split,
        uri=split_dir.uri,
        num_samples=manifest.num_samples,
        num_shards=len(manifest.shards),
        written=sum(o.written for o in done),
        skipped=sum(not o.written and o.info is not None for o in done),
        bytes_written=sum(o.size for o in done if o.written),
        deleted=deleted,
        manifest_written=manifest_written,
    )
