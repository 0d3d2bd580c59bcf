"""Where training batches come from: the multi-epoch Ray Data stream, or in-memory tensors.

The training loop asks a :class:`BatchSource` for an iterator of *micro-batches* (dicts of
tensors ``x_1``, ``x_0`` float32, ``t`` float32, ``label`` int64 (-1 = unlabelled) and,
from the stream, ``epoch`` int64), exactly ``ctx.micro_batch`` rows each, ``grad_accum``
of them per optimizer step. Two sources:

- :class:`RayDataSource` (what ``fmpipe train`` uses): ``ray.train.get_dataset_shard("train")
  .iter_torch_batches(...)`` over the stream of :func:`build_train_stream`, with the
  configured coupling applied to each micro-batch on the worker (exact OT on the batch
  being trained on). ``fmpipe bench data`` times this consumer on the same stream.
- :class:`InMemorySource`: deterministic global batches from tensors held in memory; the
  rank's slice of step ``s`` depends only on ``(seed, s)``, never on the worker count, so a
  1-worker and a 2-worker run see the same global batches (the DDP-exactness test), and a
  resumed run continues with the batches of an uninterrupted one.

The stream, one Dataset for the whole run, is built by
:func:`pipeline.data.stream.build_train_stream` (the one builder; imported here, where the
trainer takes it from): ``(epoch, shard)`` rows for the epochs ``start_epoch,
start_epoch + 1, ...``, each read, decoded and paired by one fused ``map_batches`` stage.
One pass covers enough epochs to reach ``train.total_images`` (plus margin,
:func:`epochs_needed`), so Ray Train splits one stream across the workers
(``streaming_split``) and the loop never restarts an iterator. A re-run of the command
(resume) builds the stream from the checkpoint's ``data_epoch`` (the epoch the slowest
worker was reading; the part of it already seen is seen again). After a worker restart
*within* one invocation (``FailureConfig``), Ray Train splits the same Dataset again, so
the stream starts over at the epoch this invocation started from: model, EMA, optimizer,
RNG and images seen are restored exactly, only the data order differs from an
uninterrupted run.

Validation: :func:`load_val_set` reads the val split in this process, in key order, up to
``train.val_max_images`` samples, with ``x_0`` and ``t ~ U[0, 1)`` drawn from
``(seed, key)`` on their own stream ("val"): the draws never change with training
progress, so the validation loss is a deterministic function of the weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from ray.train import UserCallback
from torch import Tensor

from pipeline.data.coupling import couple, noise_to_float, sample_generator
from pipeline.data.decode import to_model_range
from pipeline.data.stream import (
    BadSampleTracker,
    CollateBatch,
    DatasetInfo,
    TooManyBadSamples,
    build_train_stream,
    decode_spec,
    final_data_error,
    fresh_error,
    label_rule,
    read_shard,
    verify_shard,
)
from pipeline.storage import read_whole

if TYPE_CHECKING:
    from pipeline.config import Config

__all__ = [
    "BatchSource",
    "InMemorySource",
    "RayDataSource",
    "SourceContext",
    "StopOnDataErrors",
    "ValSet",
    "build_train_stream",
    "epochs_needed",
    "load_val_set",
]

BATCH_KEYS = ("x_1", "x_0", "t", "label")


@dataclass(frozen=True)
class SourceContext:
    """What a worker tells its batch source when the loop starts (or restarts)."""

    rank: int  # this worker's world rank
    world_size: int  # workers in the run
    micro_batch: int  # rows per yielded batch: batch_size / (world_size * grad_accum)
    grad_accum: int  # micro-batches per optimizer step
    batch_size: int  # global batch (images per optimizer step)
    images_seen: int  # where training starts: 0, or the resumed checkpoint's count
    data_epoch: int  # the resumed checkpoint's data epoch (0 on a fresh start)


class BatchSource(Protocol):
    """Yields micro-batches (dicts of tensors, ``ctx.micro_batch`` rows each) for one worker."""

    def batches(self, ctx: SourceContext) -> Iterator[dict[str, Tensor]]: ...


# --------------------------------------------------------------------------- the stream
def epochs_needed(remaining_images: int, samples_per_epoch: int, batch_size: int) -> int:
    """Epochs the stream must hold to feed ``remaining_images`` more images, with margin.

    One extra global batch (per-worker ``drop_last``, ``streaming_split`` evening-out) and
    two extra epochs (the partly consumed epoch a resume restarts, bad samples skipped
    within ``data.max_bad_fraction``).
    """
    if samples_per_epoch <= 0:
        raise ValueError("the training split has no samples")
    return math.ceil((max(remaining_images, 0) + batch_size) / samples_per_epoch) + 2


class RayDataSource:
    """Micro-batches from this worker's split of the Ray Train dataset ``"train"``.

    :meth:`iter_batches` is the whole consumer: ``iter_torch_batches`` as the loop needs it
    (``micro_batch`` rows, ``drop_last``), then float32 noise, int64 labels and the
    configured coupling on each micro-batch (exact OT on the batch being trained on).
    ``fmpipe bench data`` runs the same method on the same stream in its driver, so its
    figures are those of this path.

    ``keys``: the stream was built with ``keys=True``; its batches keep ``key`` (a list
    of str) through :class:`~pipeline.data.stream.CollateBatch`, since Ray's default
    collate refuses str columns. ``tracker``: the stream's bad-sample counter
    (:func:`~pipeline.data.stream.bad_sample_tracker` of its first epoch); given, a stream
    that fails over ``data.max_bad_fraction`` raises :class:`TooManyBadSamples` with the
    report, whatever Ray wrapped it in, and a stream read to its end is checked. A final
    :class:`~pipeline.data.stream.DatasetError` from the stream (a shard that does not
    match its manifest) is raised as itself, tracker or not.
    """

    def __init__(
        self,
        *,
        coupling: str = "independent",
        ot_per_class: bool = False,
        prefetch_batches: int = 2,
        dataset_name: str = "train",
        keys: bool = False,
        tracker: BadSampleTracker | None = None,
    ) -> None:
        self.coupling = coupling
        self.ot_per_class = ot_per_class
        self.prefetch_batches = prefetch_batches
        self.dataset_name = dataset_name
        self.keys = keys
        self.tracker = tracker

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> RayDataSource:
        """The source the loop builds from ``data.coupling``, ``data.ot_per_class`` and
        ``data.prefetch_batches`` (what :func:`pipeline.train.loop.training_loop` uses)."""
        return cls(
            coupling=cfg.data.coupling,
            ot_per_class=cfg.data.ot_per_class,
            prefetch_batches=cfg.data.prefetch_batches,
            **kwargs,
        )

    def batches(self, ctx: SourceContext) -> Iterator[dict[str, Tensor]]:
        import ray.train

        shard = ray.train.get_dataset_shard(self.dataset_name)
        if shard is None:
            raise RuntimeError(
                f"no Ray Train dataset '{self.dataset_name}': pass datasets={{'train': ...}} "
                "to the trainer, or give the loop another batch_source"
            )
        yield from self.iter_batches(shard, ctx.micro_batch)

    def iter_batches(
        self, data: Any, micro_batch: int, *, drop_last: bool = True
    ) -> Iterator[dict[str, Tensor]]:
        """Train-ready micro-batches of ``data`` (a ``DataIterator``, as Ray Train hands a
        worker, or a ``Dataset``): ``x_1``, ``x_0`` float32, ``t`` float32, ``label``
        int64, ``epoch`` int64 (and ``key``). ``drop_last``: the loop steps on full
        micro-batches only (every rank the same rows per step)."""
        collate = CollateBatch() if self.keys else None
        batches = data.iter_torch_batches(
            batch_size=micro_batch,
            prefetch_batches=self.prefetch_batches,
            drop_last=drop_last,
            device="cpu",
            collate_fn=collate,
        )
        try:
            for batch in batches:
                yield self._train_batch(batch)
        except Exception as exc:  # a stage's DatasetError arrives wrapped by Ray
            if self.tracker is not None:
                report = self.tracker.report()
                if report.exceeded:
                    raise TooManyBadSamples(report.summary(), report) from exc
            final = final_data_error(exc)
            if final is not None:  # itself, one line, not Ray's wrapper around it
                raise fresh_error(final) from exc
            raise
        if self.tracker is not None:
            self.tracker.check()

    def _train_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        x_0 = noise_to_float(batch["x_0"])
        label = batch["label"].long()
        if self.coupling != "independent":
            x_0 = couple(batch["x_1"], x_0, label if self.ot_per_class else None,
                         self.coupling, self.ot_per_class)  # fmt: skip
        out = {
            "x_1": batch["x_1"].float(),
            "x_0": x_0,
            "t": batch["t"].float(),
            "label": label,
            "epoch": batch["epoch"].long(),
        }
        if self.keys:
            out["key"] = batch["key"]
        return out


class StopOnDataErrors(UserCallback):
    """Ray Train callback: end the run at the first worker error a retry cannot fix.

    Ray Train V2 restarts the worker group on *every* worker error, up to
    ``FailureConfig(max_failures)`` times (its ``DefaultFailurePolicy`` counts any
    ``WorkerGroupError`` as retryable, and the policy cannot be replaced), so a shard that
    does not match its manifest used to fail 1 + max_failures times, each after a full
    worker start, before the run gave up. Ray Train calls ``after_exception`` on the
    controller as soon as a health check finds a worker error, *before* its failure
    decision; an exception raised from it becomes a ``ControllerError``, which the default
    policy does not retry. So: when a worker's error holds a final
    :class:`~pipeline.data.stream.DatasetError` (:func:`final_data_error`), raise it here,
    and the run ends at once; ``fit()`` raises ``ControllerError`` with it as
    ``controller_failure`` (``final_data_error`` on the driver gets it back). Any other
    worker error (a killed worker, storage down) is left to ``FailureConfig``.

    A transient error (a killed worker, storage down) is retried with backoff and reported:
    before the ``n``-th restart the controller waits ``backoff_s * 2**(n-1)`` seconds (at
    most :data:`MAX_BACKOFF_S`: a store that is restarting gets time to come back) and sends
    a ``retry`` event (the worker, its error in one line, the wait, the attempt) to the
    driver's progress queue, which prints it. After ``max_failures`` restarts Ray Train gives
    up and ``fit()`` raises the error.

    Use: ``RunConfig(callbacks=[StopOnDataErrors(max_failures, backoff_s, queue)],
    failure_config=FailureConfig(max_failures))``.
    """

    MAX_BACKOFF_S = 60.0

    def __init__(self, max_failures: int = 0, backoff_s: float = 0.0, queue: Any = None) -> None:
        self.max_failures = int(max_failures)
        self.backoff_s = float(backoff_s)
        self.queue = queue  # ray.util.queue.Queue of the driver's progress printer, or None
        self.failures = 0  # worker-group failures seen so far (the controller keeps this)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            final = final_data_error(worker_exceptions[rank])
            if final is not None:
                raise fresh_error(final)
        self.failures += 1
        if not worker_exceptions or self.failures > self.max_failures:
            return  # Ray Train gives up now: fit() raises the error itself
        delay = min(self.backoff_s * 2 ** (self.failures - 1), self.MAX_BACKOFF_S)
        rank = min(worker_exceptions)
        event = {
            "kind": "retry",
            "rank": rank,
            "error": _one_line_error(worker_exceptions[rank]),
            "delay_s": delay,
            "attempt": self.failures + 1,
            "attempts": self.max_failures + 1,
        }
        if self.queue is not None:
            with contextlib.suppress(Exception):  # the report must never fail the run
                self.queue.put_nowait(event)
        time.sleep(delay)


def _one_line_error(exc: BaseException) -> str:
    """``Type: first line of the message`` of a worker's error (Ray's wrapper taken off),
    scrubbed, at most 300 characters: what the retry line shows."""
    from pipeline.redact import scrub

    cause = getattr(exc, "cause", None)
    inner = cause if isinstance(cause, BaseException) else exc
    text = str(inner).strip().split("\n", 1)[0] or type(inner).__name__
    line = f"{type(inner).__name__}: {text}" if type(inner).__name__ not in text else text
    line = scrub(line)
    return line if len(line) <= 300 else line[:297] + "..."


# --------------------------------------------------------------------------- in memory
class InMemorySource:
    """Deterministic global batches from in-memory images (tests, benchmarks).

    Step ``s`` takes rows ``(s * B + i) % N`` of ``x_1`` (``B`` = global batch) and draws
    ``x_0 ~ N(0, I)`` and ``t ~ U[0, 1)`` from a generator seeded by ``(seed, s)``. The
    global batch is laid out as ``[micro j][rank k][row]``: rank ``k``'s ``j``-th
    micro-batch of the step is rows ``j * B / A + k * m + [0, m)``.
    """

    def __init__(
        self, x_1: Tensor, label: Tensor | None = None, seed: int = 0, epoch_size: int | None = None
    ) -> None:
        if x_1.ndim < 2 or len(x_1) == 0:
            raise ValueError("x_1 must be a non-empty batch of samples (N, ...)")
        self.x_1 = x_1.float().cpu()
        n = len(x_1)
        self.label = (
            label.long().cpu() if label is not None else torch.full((n,), -1, dtype=torch.long)
        )
        self.seed = int(seed)
        self.epoch_size = epoch_size or n

    def global_batch(self, step: int, batch_size: int) -> dict[str, Tensor]:
        """The whole global batch of optimizer step ``step``."""
        n = len(self.x_1)
        index = (step * batch_size + torch.arange(batch_size)) % n
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x_0 = torch.randn((batch_size, *self.x_1.shape[1:]), generator=gen)
        t = torch.rand(batch_size, generator=gen)
        epoch = (step * batch_size + torch.arange(batch_size)) // self.epoch_size
        return {
            "x_1": self.x_1[index],
            "x_0": x_0,
            "t": t,
            "label": self.label[index],
            "epoch": epoch,
        }

    def batches(self, ctx: SourceContext) -> Iterator[dict[str, Tensor]]:
        if ctx.images_seen % ctx.batch_size:
            raise ValueError("InMemorySource resumes only at whole steps")
        step = ctx.images_seen // ctx.batch_size
        chunk = ctx.batch_size // ctx.grad_accum
        while True:
            full = self.global_batch(step, ctx.batch_size)
            for j in range(ctx.grad_accum):
                lo = j * chunk + ctx.rank * ctx.micro_batch
                yield {k: v[lo : lo + ctx.micro_batch] for k, v in full.items()}
            step += 1


# --------------------------------------------------------------------------- validation
@dataclass
class ValSet:
    """Fixed validation draws: ``x_1``, ``x_0`` ``(N, C, H, W)``, ``t`` ``(N,)``, ``label``."""

    x_1: Tensor
    x_0: Tensor
    t: Tensor
    label: Tensor  # int64, -1 = unlabelled
    keys: list[str]

    def __len__(self) -> int:
        return len(self.x_1)


def load_val_set(cfg: Config, info: DatasetInfo, max_images: int) -> ValSet:
    """The first ``max_images`` val samples in key order, with fixed ``(x_0, t)`` draws.

    Reads the shards in this process (no Ray); bad samples are skipped as in training, and
    a shard that does not match its manifest's sha256 raises
    :class:`~pipeline.data.stream.ShardIntegrityError`, as in training (here, before any
    worker starts). ``x_0`` and then ``t ~ U[0, 1)`` come from
    ``sample_generator(seed, 0, key, "val")``. Like the flip, ``data.resize=random_crop``
    is training augmentation: the val set reads the centred square.
    """
    spec = decode_spec(cfg)
    if spec.resize == "random_crop":
        spec = replace(spec, resize="center_crop")
    samples: list[tuple[str, int, np.ndarray]] = []
    for shard in sorted(info.shards, key=lambda s: s.name):
        data = read_whole(info.filesystem, shard.path)
        verify_shard(data, shard.uri, shard.sha256)
        got, _ = read_shard(data, shard.name, shard.num_samples, spec,
                            num_classes=info.manifest.num_classes,
                            labels=label_rule(cfg, info))  # fmt: skip
        samples.extend(got)
    samples.sort(key=lambda s: s[0])
    samples = samples[:max_images]
    if not samples:
        raise ValueError(f"the val split of {info.uri} has no readable samples")
    x_1 = torch.from_numpy(to_model_range(np.stack([img for _, _, img in samples])))
    x_0 = torch.empty_like(x_1)
    t = torch.empty(len(samples))
    for i, (key, _, _) in enumerate(samples):
        gen = sample_generator(cfg.seed, 0, key, stream="val")
        torch.randn(x_1.shape[1:], generator=gen, out=x_0[i])
        t[i] = torch.rand(1, generator=gen)[0]
    label = torch.tensor([lab for _, lab, _ in samples], dtype=torch.long)
    return ValSet(x_1=x_1, x_0=x_0, t=t, label=label, keys=[k for k, _, _ in samples])
