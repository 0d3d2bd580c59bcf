"""Where a run resumes: the newest *complete* checkpoint, chosen once by the driver.

A checkpoint directory is complete when its ``state.json`` parses and every file it lists
(``TrainState.files``: name -> size, written by :func:`pipeline.checkpoint.save_checkpoint`
after the files themselves) is there with that size. An upload interrupted by a crash or an
S3 outage leaves a directory that fails this check; it is skipped with a warning, never
half-used.

Ray Train resumes from the newest checkpoint *it registered*, which can be older than the
newest complete one (a report collected after the crash, or not at all). So the driver does
not rely on it: it picks the newest complete checkpoint here, builds the data stream from
that checkpoint's data epoch, checks the config against that checkpoint's, and hands it to
the workers (:class:`ResumePoint` in the run context). A worker restores it, unless Ray
Train hands it a *newer* one (a worker restarted by ``FailureConfig`` within this
invocation, after it reported a checkpoint): weights, optimizer, data epoch and images seen
then always come from one and the same checkpoint.

Ray Train keeps its own list of the run's checkpoints in ``checkpoint_manager_snapshot.json``
(for ``CheckpointConfig.num_to_keep``), rewritten in place after every checkpoint. A write
cut short (a full disk, storage gone) leaves it empty or half written, and a user who
deletes a checkpoint folder leaves it naming one that is gone; Ray then refuses to start the
run at all, every time. fmpipe does not need that list to resume, so
:func:`set_aside_broken_ray_snapshot` moves such a file aside (kept, renamed) before the
run starts; Ray begins a new list, and checkpoints written before it are no longer pruned
by ``train.keep_checkpoints`` (nothing is deleted that the user may want).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import yaml

from pipeline.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    TrainState,
    saved_config,
)
from pipeline.config import Config, ConfigError
from pipeline.home import data_uri
from pipeline.storage import Location, read_whole

__all__ = [
    "ResumePoint",
    "check_resumable",
    "describe",
    "find_resume_point",
    "incomplete",
    "local_copy",
    "set_aside_broken_ray_snapshot",
]

log = logging.getLogger(__name__)

_LEGACY_FILES = (MODEL_FILE, CONFIG_FILE)  # checkpoints written before TrainState.files


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint of this run: where it is and what its ``state.json`` says."""

    location: Location  # the checkpoint directory (picklable: workers read it)
    name: str  # checkpoint_<images_seen:012d>
    state: TrainState

    @property
    def images_seen(self) -> int:
        return self.state.images_seen


def _listing(directory: Location) -> dict[str, int]:
    """``{file name: size}`` of the files directly in ``directory`` ({} when missing)."""
    try:
        infos = directory.filesystem.get_file_info(
            pafs.FileSelector(directory.path, recursive=False, allow_not_found=True)
        )
    except (OSError, FileNotFoundError):
        return {}
    return {i.base_name: int(i.size or 0) for i in infos if i.type == pafs.FileType.File}


def incomplete(state: TrainState, present: dict[str, int]) -> str:
    """Why a checkpoint with ``state`` and files ``present`` is incomplete ("" if it is not)."""
    expected = state.files or {name: -1 for name in _LEGACY_FILES}
    problems = []
    for name, size in sorted(expected.items()):
        if name not in present:
            problems.append(f"{name} missing")
        elif size >= 0 and present[name] != size:
            problems.append(f"{name} has {present[name]:,} of {size:,} bytes")
    return ", ".join(problems)


def find_resume_point(run_dir: Location) -> ResumePoint | None:
    """The newest complete checkpoint under ``run_dir`` (by images seen), or None."""
    names = sorted(
        (name for name in _subdirectories(run_dir) if name.startswith("checkpoint_")),
        reverse=True,
    )
    for name in names:
        directory = run_dir.child(name)
        present = _listing(directory)
        if STATE_FILE not in present:
            log.warning("skipping checkpoint %s: %s missing (interrupted upload)", name, STATE_FILE)
            continue
        try:
            text = read_whole(directory.filesystem, f"{directory.path}/{STATE_FILE}").decode()
            state = TrainState.from_json(text, directory.uri)
        except (OSError, CheckpointError, UnicodeDecodeError) as exc:
            log.warning("skipping checkpoint %s: unreadable %s (%s)", name, STATE_FILE, exc)
            continue
        problem = incomplete(state, present)
        if problem:
            log.warning("skipping incomplete checkpoint %s: %s", directory.uri, problem)
            continue
        return ResumePoint(directory, name, state)
    return None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints


def _snapshot_problem(raw: bytes, folders: set[str]) -> str:
    """Why Ray Train could not start from snapshot bytes ``raw`` ("" if it could)."""
    try:
        snapshot = json.loads(raw.decode())
        results = snapshot["checkpoint_results"]
        names = [r["checkpoint_dir_name"] for r in results]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return "empty" if not raw.strip() else f"unreadable ({type(exc).__name__}: {exc})"
    gone = sorted(name for name in names if name not in folders)
    return f"names checkpoint folders that are gone: {', '.join(gone)}" if gone else ""


def set_aside_broken_ray_snapshot(run_dir: Location) -> str:
    """Move Ray Train's checkpoint list out of the way when it would stop the run starting
    (see the module doc); returns the line that says so ("" when it is sound or absent)."""
    snapshot = run_dir.child(RAY_SNAPSHOT)
    if not snapshot.exists():
        return ""
    raw = snapshot.read_bytes()
    problem = _snapshot_problem(raw, set(_subdirectories(run_dir)))
    if not problem:
        return ""
    kept = run_dir.child(f"{RAY_SNAPSHOT}.broken-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    kept.write_bytes(raw)
    snapshot.delete()
    return (
        f"Ray Train's checkpoint list {snapshot.uri} was {problem} (a write cut short?): "
        f"kept as {kept.name}; the run resumes from its checkpoint folders"
    )


def _subdirectories(run_dir: Location) -> list[str]:
    try:
        infos = run_dir.filesystem.get_file_info(
            pafs.FileSelector(run_dir.path, recursive=False, allow_not_found=True)
        )
    except (OSError, FileNotFoundError):
        return []
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory]


def _checkpoint_config(point: ResumePoint) -> Config:
    directory = point.location
    try:
        raw = read_whole(directory.filesystem, f"{directory.path}/{CONFIG_FILE}")
        return saved_config(yaml.safe_load(raw.decode()) or {})
    except (OSError, yaml.YAMLError, ConfigError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {directory.uri}: unreadable {CONFIG_FILE}: {exc}"
        ) from None


def _objective_settings(cfg: Config) -> dict[str, object]:
    """What the steps minimise, as settings: ``train.objective``, and a student's
    ``distill_steps``, ``distill_loss`` and ``distill_states``."""
    t = cfg.train
    if t.objective != "distill":
        return {"train.objective": t.objective}
    return {
        "train.objective": t.objective,
        "train.distill_steps": t.distill_steps,
        "train.distill_loss": t.distill_loss,
        "train.distill_states": t.distill_states,
    }


def check_resumable(cfg: Config, point: ResumePoint) -> None:
    """Raise ConfigError (one line) when ``cfg`` cannot continue the run of ``point``.

    What must stay: the network (``model.*``), the image it takes (``data.resolution``,
    ``data.channels``), the data (``data.uri`` as :func:`~pipeline.home.data_uri` resolves
    it, ``data.pairs``) and what the steps minimise (``train.objective`` and a student's
    ``distill_*``: a finished run resumed under another objective would be registered as
    trained on it). Everything else (duration, learning rate, intervals, workers, ...) may
    change between invocations.
    """
    saved = _checkpoint_config(point)
    changed = [
        f"{section}.{key}={mine!r} (the run has {theirs!r})"
        for section, mine_tree, their_tree in (
            ("model", cfg.model.model_dump(), saved.model.model_dump()),
            (
                "data",
                {"resolution": cfg.data.resolution, "channels": cfg.data.channels},
                {"resolution": saved.data.resolution, "channels": saved.data.channels},
            ),
        )
        for key, mine in mine_tree.items()
        if (theirs := their_tree.get(key)) != mine
    ]
    # The run's data: continuing a run on another dataset would silently mix two datasets
    # in one model (the job defaults give every run the same name, `digits`).
    for key, mine, theirs in (
        ("data.uri", data_uri(cfg), data_uri(saved)),
        ("data.pairs", cfg.data.pairs, saved.data.pairs),
    ):
        if mine.strip().rstrip("/") != theirs.strip().rstrip("/"):
            changed.append(f"{key}={mine!r} (the run has {theirs!r})")
    mine, theirs = _objective_settings(cfg), _objective_settings(saved)
    changed += [f"{key}={mine[key]!r} (the run has {theirs.get(key)!r})"
                for key in mine if mine[key] != theirs.get(key)]  # fmt: skip
    if changed:
        raise ConfigError(
            f"cannot resume run '{cfg.train.run_name}' from {point.location.uri}: "
            f"{'; '.join(changed)}. Resuming needs the same network and data; use the run's "
            "values, or give this config another train.run_name to start a new run"
        )


@contextlib.contextmanager
def local_copy(point: ResumePoint) -> Iterator[Path]:
    """The checkpoint's files in a local temporary directory, for the duration of the block."""
    source = point.location
    with tempfile.TemporaryDirectory(prefix="fmpipe-resume-") as tmp:
        names = sorted(point.state.files) or [*_LEGACY_FILES]
        for name in {*names, STATE_FILE}:
            data = read_whole(source.filesystem, f"{source.path}/{name}")
            Path(tmp, name).write_bytes(data)
        yield Path(tmp)


def describe(point: ResumePoint) -> str:
    """``checkpoint_000000002048 (2,048 images)`` for console lines."""
    return f"{point.name} ({point.images_seen:,} images)"
