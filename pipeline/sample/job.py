"""``fmpipe sample``: bulk generation as a Ray Data batch-inference job.

:func:`generate` is a short driver over three named steps, each in its own module:

1. **plan** (:func:`pipeline.sample.plan.plan_job`), before any Ray work: resolve the model
   (registry alias/version or checkpoint; its config travels with it), check the settings
   against it and the output location is writable. Cut ``[0, N)`` into fixed shards
   ``[j * shard_size, min((j + 1) * shard_size, N))``. The job's identity (model weights
   digest, seed, solver, the steps the solver really takes, N, shard size, block size, ...)
   is written once to ``<out>/_sample_job.json``; a re-run with other settings on the same
   output is refused (it would mix two jobs' samples). A shard object already under its
   final name is done (names appear only when complete: writes are atomic); it is read back
   and checked to hold exactly its indices. Only missing (or broken) shards are planned.
2. **run** (:func:`pipeline.sample.pool.run_pool`): the missing shards become rows of
   ``ray.data.from_items`` (one block per shard), mapped by
   ``map_batches(SamplerActor, compute=ActorPoolStrategy(size=num_actors), batch_size=1)``:
   each actor builds the network once (weights from the Ray object store) and writes whole
   shards. Actors are restartable (``max_restarts``) and their tasks retried
   (``max_task_retries``), so a killed actor's shard is redone and the job still ends with
   exactly N samples, each index once. The driver prints a ``[sample]`` progress line as
   shards come back (the first, the last, and at most one per ``PROGRESS_EVERY_S``).
3. **finalize** (:func:`pipeline.sample.finalize.finalize`): ``_manifest.json`` (every
   shard with its count and sha256) is written atomically last. A grid of the first 64
   samples is saved locally (``$FMPIPE_HOME/samples/<name>/grid.png``) and, with the
   parameters, samples/s, NFE per sample, the output URI and the manifest, logged to an
   MLflow run in ``tracking.sample_experiment`` tagged with the training run; the summary
   lines are printed.

Determinism (see :mod:`pipeline.sample.determinism`): sample i is bit-identical whatever
``sample.batch_size``, ``sample.num_actors``, the shard boundaries, N, or restarts, for a
given model, seed, solver settings, block size and device type (CPU vs CUDA kernels differ;
a CPU and a GPU run are not bit-identical to each other). ``sample.batch_size`` only sets how
many samples an actor holds and encodes at once; the network always runs on whole compute
blocks of ``block_size`` samples (50 on CPU, 500 on CUDA by default).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from pipeline.config import Config
from pipeline.sample.finalize import SampleResult, finalize, grid_path_for, start_tracker
from pipeline.sample.plan import JOB_FILE, SampleJobError, plan_job
from pipeline.sample.pool import run_pool
from pipeline.sample.source import ModelSource

__all__ = ["JOB_FILE", "SampleJobError", "SampleResult", "generate", "grid_path_for"]


def generate(
    cfg: Config,
    *,
    source: ModelSource | None = None,
    block_size: int | None = None,
    track: bool = True,
    log_line: Callable[[str], None] | None = print,
) -> SampleResult:
    """Generate ``cfg.sample.num_samples`` samples into ``cfg.sample.out`` (see module doc).

    Args:
        cfg: the job config; ``cfg.sample`` holds every sampling knob.
        source: the network to use instead of resolving ``cfg.sample.model`` (any picklable
            zero-argument factory wrapped by :meth:`ModelSource.from_factory`).
        block_size: samples per compute block (default 50 on CPU, 500 on CUDA). Part of the
            job's identity: changing it changes the bits of the samples.
        track: log an MLflow run (``tracking.sample_experiment``).
        log_line: where progress and summary lines go (None: nowhere).

    Raises:
        pipeline.registry.ModelNotFound, pipeline.checkpoint.CheckpointError: bad model.
        pipeline.storage.StorageError: the output cannot be used.
        SampleJobError: settings that clash with the model or with the output's earlier job.
    """
    say = log_line or (lambda _line: None)
    began = time.perf_counter()
    plan = plan_job(cfg, source, block_size, say)
    tracker = start_tracker(cfg, plan) if track else None
    try:
        ran = run_pool(plan, cfg.sample.num_actors, cfg.sample.use_gpu, say)
        result = finalize(cfg, plan, ran, tracker, began)
        if tracker is not None:
            tracker.end("FINISHED")
    except BaseException as exc:
        if tracker is not None:
            with contextlib.suppress(Exception):
                tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    for line in result.summary_lines(tracker.tracking_uri if tracker else None):
        say(line)
    return result
