"""What the driver hands every Ray Train worker: the validated config and a small run context.

The worker receives one :class:`WorkerSpec`: the :class:`~pipeline.config.Config` exactly as
the driver validated it (every knob of the loop is read from there, nowhere else) and a
:class:`RunContext` with what the driver found out before any worker started: the shape of
one training image, the training split's manifest hash, the MLflow run to write to, the
checkpoint it resumes (the newest complete one), the weights a fresh run starts from, and
(tests, benchmarks) an in-memory batch source and
validation set. Ray ships it to the workers with cloudpickle inside ``train_loop_config``.

This module also holds the two small rules that the driver and the workers must agree on:
how the global batch splits (:func:`micro_batch_size`) and how checkpoint directories are
named (:func:`checkpoint_dir_name`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os

    from torch import Tensor

    from pipeline.config import Config
    from pipeline.eval.probe import QualityProbe
    from pipeline.train.data import BatchSource, ValSet
    from pipeline.train.resume import ResumePoint

__all__ = [
    "InitWeights",
    "RunContext",
    "TrackingHandle",
    "WorkerSpec",
    "checkpoint_dir_name",
    "micro_batch_size",
]

_SPEC_KEY = "spec"  # the one key of ``train_loop_config``


def micro_batch_size(batch_size: int, num_workers: int, grad_accum: int) -> int:
    """Rows per worker per micro-batch: ``batch_size / (num_workers * grad_accum)``.

    Raises:
        ValueError: the global batch does not split evenly (names the three settings).
    """
    parts = num_workers * grad_accum
    if batch_size % parts:
        raise ValueError(
            f"data.batch_size={batch_size} (the global batch) must be divisible by "
            f"train.num_workers * train.grad_accum = {num_workers} * {grad_accum} = {parts}"
        )
    return batch_size // parts


def checkpoint_dir_name(images_seen: int) -> str:
    """Name of a checkpoint directory in storage: sortable by images seen."""
    return f"checkpoint_{images_seen:012d}"


@dataclass(frozen=True)
class TrackingHandle:
    """The MLflow run the driver started (or continued); rank 0 writes to it."""

    uri: str  # tracking URI as the driver resolved it (env > config > embedded sqlite)
    run_id: str
    experiment: str
    run_name: str


@dataclass(frozen=True)
class InitWeights:
    """Weights a run starts from when it has no checkpoint of its own to resume.

    ``fmpipe retrain`` continues a candidate from the champion this way: model and EMA
    states; optimizer, learning-rate schedule, RNG and images seen start fresh. The tensors
    travel with the spec (Ray's object store), so every worker on every node gets them.
    """

    source: str  # where they came from, for messages and the MLflow tag (models:/name/3)
    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike[str], source: str) -> InitWeights:
        """The model and EMA states of the fmpipe checkpoint in ``directory``."""
        from pipeline.checkpoint import load_checkpoint

        loaded = load_checkpoint(directory)
        return cls(source=source, model=loaded.model, ema=loaded.ema)


@dataclass(frozen=True)
class RunContext:
    """What the driver learned before the workers start (see the module doc)."""

    data_shape: tuple[int, ...]  # (C, H, W) of one training image
    manifest_hash: str = ""  # training split's Manifest.content_hash(), saved and tagged
    class_names: tuple[str, ...] = ()  # label id -> name (the dataset's), saved with the model
    tracking: TrackingHandle | None = None  # None: no MLflow
    resume: ResumePoint | None = None  # the newest complete checkpoint of this run
    init: InitWeights | None = None  # weights of a fresh start; None: seeded init
    batch_source: BatchSource | None = None  # None: the Ray Train dataset "train"
    val_set: ValSet | None = None  # fixed validation draws; None: no validation loss
    quality: QualityProbe | None = None  # train.eval_every_images: network + reference
    progress_queue: Any = None  # ray.util.queue.Queue for the driver's progress lines
    run_uri: str = ""  # the run's folder (its checkpoints' home), named by a failed write
    # lineage set on the MLflow run and the registered version (reflow: base, pair set, k)
    lineage: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerSpec:
    """The validated config and the run context: everything a worker is given."""

    config: Config
    context: RunContext

    def to_loop_config(self) -> dict[str, Any]:
        """``TorchTrainer(train_loop_config=...)``: Ray requires a dict."""
        return {_SPEC_KEY: self}

    @classmethod
    def from_loop_config(cls, loop_config: Mapping[str, Any]) -> WorkerSpec:
        spec = loop_config.get(_SPEC_KEY)
        if not isinstance(spec, cls):
            raise TypeError(
                "train_loop_config must be WorkerSpec.to_loop_config(), "
                f"got keys {sorted(loop_config)}"
            )
        return spec
