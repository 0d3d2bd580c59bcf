"""Step 2 of ``fmpipe sample``: the Ray Data job that writes the missing shards.

:func:`run_pool` turns the plan's missing shards into rows of ``ray.data.from_items`` (one
block per shard) and maps them with
``map_batches(SamplerActor, compute=ActorPoolStrategy(size=num_actors), batch_size=1)``:
each actor builds the network once (weights from the Ray object store) and writes whole
shards. Actors are restartable (``max_restarts``) and their tasks retried
(``max_task_retries``), so a killed actor's shard is redone and the job still ends with
exactly N samples, each index once. The driver prints a ``[sample]`` progress line as
shards come back (the first, the last, and at most one per ``PROGRESS_EVERY_S``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.rayenv import ensure_ray, quiet_cpp_notices
from pipeline.sample.plan import SampleJobError, SamplePlan
from pipeline.sample.sampler import SamplerActor
from pipeline.sample.source import CheckpointBuilder, ModelSource

__all__ = [
    "MAX_RESTARTS",
    "MAX_TASK_RETRIES",
    "PROGRESS_EVERY_S",
    "PoolRun",
    "actor_resources",
    "run_pool",
]

MAX_RESTARTS = 4  # actor restarts after a crash (per actor)
MAX_TASK_RETRIES = 4  # retries of one shard's task after its actor died
PROGRESS_EVERY_S = 10.0  # at most one progress line per this many seconds (and first, last)


@dataclass
class PoolRun:
    """What the actor pool wrote: one row per shard (``SamplerActor`` result columns)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # the Ray job (integrating + writing); 0 when nothing was missing


def actor_resources(num_actors: int, use_gpu: bool) -> tuple[float, int]:
    """``(num_cpus per actor, torch threads per actor)`` on the running Ray cluster.

    CPU actors share the cluster's CPUs less half a CPU, which stays free for Ray Data's own
    operators (without it the input stage gets no budget and the job stalls on a small
    machine), and never ask for more than the largest node has. A GPU actor takes one GPU
    and one CPU. ``fmpipe bench sample`` uses the same rule for its in-process runs.

    Raises:
        SampleJobError: ``use_gpu`` on a cluster without a GPU.
    """
    import ray

    cluster = ray.cluster_resources()
    if use_gpu:
        if cluster.get("GPU", 0) < 1:
            raise SampleJobError(
                "sample.use_gpu is true but the Ray cluster has no GPU; set sample.use_gpu=false"
            )
        return 1.0, 2
    cpus = float(cluster.get("CPU", 1.0))
    # An actor lives on one node: never ask for more than the largest node has (less the
    # half CPU for Ray Data), or on a multi-node cluster it could never be scheduled.
    nodes = [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, default=cpus)
    per_actor = max(0.25, min((cpus - 0.5) / num_actors, largest - 0.5))
    return round(per_actor, 3), max(1, math.ceil(per_actor))


def _shared_factory(source: ModelSource) -> Any:
    """The network factory with its weights in the Ray object store: one copy for all actors."""
    import ray

    factory = source.factory
    if isinstance(factory, CheckpointBuilder) and not isinstance(factory.weights, ray.ObjectRef):
        factory = CheckpointBuilder(factory.model, factory.data_shape, ray.put(factory.weights))
    return factory


def _map_shards(plan: SamplePlan, actors: int, num_cpus: float, use_gpu: bool) -> Any:
    """The lazy Ray dataset: one input row (and block) per missing shard, one output row each."""
    import ray

    items = [{"shard": j, "start": a, "stop": b} for j, a, b in plan.todo]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # Ray 2.60 marks extra remote args (max_restarts, max_task_retries) as deprecated in
        # favour of named parameters, which do not exist for these two yet; its own default
        # is -1 (forever) for both, which would loop on a shard that kills its actor each time.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return dataset.map_batches(
            SamplerActor,
            fn_constructor_kwargs={
                "factory": _shared_factory(plan.source),
                "settings": plan.settings,
            },
            # Two shards in flight per actor: the next one is queued at the actor while it
            # works, so it never waits ~0.2 s for the driver's scheduling loop between
            # shards (measured); a killed actor's queued shard is retried like its current.
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
            batch_size=1,
            batch_format="numpy",
            num_cpus=num_cpus,
            num_gpus=1 if use_gpu else 0,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
        )


def _collect(
    results: Iterable[dict[str, Any]], shards: int, total: int, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The result rows as shards are written, with a ``[sample]`` progress line now and then."""
    rows: list[dict[str, Any]] = []
    began, said, written = time.perf_counter(), -math.inf, 0
    for row in results:  # one row per shard, as each is written
        rows.append(dict(row))
        written += int(row["num_samples"])
        now = time.perf_counter()
        if len(rows) in (1, shards) or now - said >= PROGRESS_EVERY_S:
            said = now
            say(
                f"[sample] {len(rows):,} / {shards:,} shards  {written:,} / {total:,} samples "
                f"({100 * written / total:5.1f}%)  {written / (now - began):7.1f} samples/s"
            )
    return rows


def _sample_shards(
    plan: SamplePlan, num_actors: int, use_gpu: bool, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Run the actor pool over the plan's missing shards (Ray already up)."""
    actors = min(num_actors, len(plan.todo))
    num_cpus, threads = actor_resources(actors, use_gpu)
    plan.settings.torch_threads = threads
    results = _map_shards(plan, actors, num_cpus, use_gpu)
    total = sum(b - a for _, a, b in plan.todo)
    say(
        f"sampling {total:,} samples in {len(plan.todo):,} shards on {actors} "
        f"{'GPU' if use_gpu else 'CPU'} actor(s) ({num_cpus:g} CPU, {threads} torch threads each)"
    )
    return _collect(results.iter_rows(), len(plan.todo), total, say)


def run_pool(
    plan: SamplePlan, num_actors: int, use_gpu: bool, say: Callable[[str], None]
) -> PoolRun:
    """Write the plan's missing shards on an actor pool; nothing to do: an empty run.

    Starts a local Ray when none is connected (and shuts it down after); progress goes to
    ``say`` as the job's own ``[sample]`` lines (Ray Data's bars stay off).
    """
    if not plan.todo:
        return PoolRun()
    started_ray = ensure_ray()
    try:
        t0 = time.perf_counter()
        with quiet_cpp_notices():  # ray#53727's notice stays in Ray's driver log
            rows = _sample_shards(plan, num_actors, use_gpu, say)
        return PoolRun(rows, time.perf_counter() - t0)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
