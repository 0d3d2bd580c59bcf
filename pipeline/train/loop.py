"""The training loop every Ray Train worker runs: a short driver over named parts.

:func:`train_loop_per_worker` is the ``TorchTrainer`` entry point; it unpacks the
:class:`~pipeline.train.spec.WorkerSpec` (the validated config and the run context) and
calls :func:`training_loop`, which

1. places the worker (device, torch threads, malloc settings: :mod:`pipeline.rayenv`);
2. builds or restores its parts (:func:`pipeline.train.setup.build_parts`: network, EMA,
   optimizer, images seen; resume from ``ray.train.get_checkpoint()``, or start from the
   context's init weights, or from seeded weights);
3. opens rank 0's MLflow run (the one the driver started) and the progress line;
4. takes optimizer steps (:class:`pipeline.train.step.CFMStep`) from the batch source
   until ``train.total_images``, firing the interval events after each
   (:class:`pipeline.train.events.Events`: log, validation, grid, checkpoint, and the final
   registration).

Counting. Durations and intervals are in images, counted globally: every step consumes
``data.batch_size`` images whatever the worker count, so a config means the same run on 1
or 64 workers, and the run ends at exactly ``train.total_images``.

Resume. ``ray.train.get_checkpoint()`` (Ray Train finds it after a worker restart, or when
the same ``name`` + ``storage_path`` is run again) restores model, EMA, optimizer, images
seen, step, data epoch, per-rank RNG states and the MLflow run id; training continues to
the same total in the same MLflow run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.rayenv import keep_freed_memory
from pipeline.train.data import RayDataSource, SourceContext
from pipeline.train.dist import WorkerGroup
from pipeline.train.events import Events, Progress
from pipeline.train.setup import TrainingParts, build_parts, worker_device, worker_threads
from pipeline.train.spec import RunContext, WorkerSpec, micro_batch_size
from pipeline.train.step import CFMStep

__all__ = ["train_loop_per_worker", "training_loop"]


def train_loop_per_worker(loop_config: Mapping[str, Any]) -> None:
    """The ``TorchTrainer`` entry point: ``training_loop(WorkerSpec.from_loop_config(...))``."""
    training_loop(WorkerSpec.from_loop_config(loop_config))


def _open_tracker(ctx: RunContext, chief: bool) -> Any:
    """Rank 0's handle on the driver's MLflow run; a disabled one elsewhere or untracked."""
    from pipeline.tracking import Tracker

    if not chief or ctx.tracking is None:
        return Tracker.disabled()
    # An MLflow outage must not stop training (the checkpoints are its output): metrics wait
    # for the server, and the final checkpoint's publication flushes them first.
    return Tracker.attach(ctx.tracking.uri, ctx.tracking.run_id).tolerate_outages()


def _batches(cfg: Config, ctx: RunContext, parts: TrainingParts, group: WorkerGroup, micro: int):
    source = ctx.batch_source or RayDataSource.from_config(cfg)
    source_ctx = SourceContext(
        rank=group.rank, world_size=group.world_size, micro_batch=micro,
        grad_accum=cfg.train.grad_accum, batch_size=cfg.data.batch_size,
        images_seen=parts.state.images_seen, data_epoch=parts.state.data_epoch,
    )  # fmt: skip
    return iter(source.batches(source_ctx))


def training_loop(spec: WorkerSpec) -> dict[str, Any]:
    """Train to ``train.total_images``; returns rank 0's final metrics (see the module doc)."""
    cfg, ctx = spec.config, spec.context
    device = worker_device()
    group = WorkerGroup(device)
    torch.set_num_threads(worker_threads(cfg.train.torch_threads, group.local_world_size))
    keep_freed_memory()  # each step reuses the last one's activation pages
    micro = micro_batch_size(cfg.data.batch_size, group.world_size, cfg.train.grad_accum)

    import ray.train

    parts = build_parts(cfg, ctx, group, reported=ray.train.get_checkpoint())
    tracker = _open_tracker(ctx, group.is_chief)
    progress = Progress(ctx.progress_queue if group.is_chief else None)
    state = parts.state
    if tracker.enabled:
        tracker.log_config(cfg)  # params (scrubbed) + config.yaml; unchanged ones skipped on resume
        tracker.set_tags({"fmpipe.job": "train", "fmpipe.manifest_hash": ctx.manifest_hash})
        if ctx.init is not None and not parts.resumed:
            tracker.set_tags({"fmpipe.init_from": ctx.init.source})
        if ctx.lineage:
            tracker.set_tags(ctx.lineage)
        state.mlflow_run_id = tracker.run_id
    progress.send(kind="start", images_seen=state.images_seen,
                  total_images=cfg.train.total_images, world_size=group.world_size,
                  micro_batch=micro, resumed=parts.resumed,
                  mlflow_run_id=state.mlflow_run_id)  # fmt: skip
    events = Events(cfg, ctx, parts, group, tracker, progress)
    if state.images_seen >= cfg.train.total_images:
        return events.already_done()

    batches: Iterator[dict[str, Tensor]] = _batches(cfg, ctx, parts, group, micro)
    step = CFMStep(cfg, parts, group, micro)
    parts.model.train()
    final_metrics: dict[str, Any] = {}
    while state.images_seen < cfg.train.total_images:
        before = state.images_seen
        outcome, epoch = step(batches)
        final_metrics = events.after_step(outcome, before, epoch) or final_metrics
    progress.send(kind="done", images_seen=state.images_seen, already=False)
    return final_metrics
