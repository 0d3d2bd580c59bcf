"""A worker's training parts: network, EMA, optimizer and progress, fresh or restored.

:func:`build_parts` decides where a worker starts, in this order:

1. the run's checkpoint (:mod:`pipeline.train.resume`: the newest complete one the driver
   found, or a newer one Ray Train hands a worker restarted by ``FailureConfig``): model,
   EMA, optimizer, progress and per-rank RNG states are restored exactly;
2. else the run context's :class:`~pipeline.train.spec.InitWeights` (``fmpipe retrain``
   continuing from the champion): model and EMA weights, everything else fresh;
3. else seeded initial weights (``torch.manual_seed(seed)`` on every rank, so DDP starts
   every replica equal).

The network is then wrapped for DDP (more than one worker) and ``torch.compile`` when asked.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import TrainState, load_checkpoint, load_state_into, set_rng_state
from pipeline.config import Config
from pipeline.data.coupling import sample_seed
from pipeline.models import build_model, to_device_layout
from pipeline.optim import adamw, load_adamw_state
from pipeline.train.dist import WorkerGroup
from pipeline.train.ema import EMA
from pipeline.train.spec import RunContext

__all__ = [
    "TrainingParts",
    "autocast",
    "build_parts",
    "uses_bf16",
    "worker_device",
    "worker_threads",
]

log = logging.getLogger(__name__)


def worker_threads(torch_threads: int, local_world_size: int) -> int:
    """torch threads: the knob, else this node's cores shared by its workers (>= 1).

    Ray sets ``OMP_NUM_THREADS`` from a worker's CPU resource, so a 1-CPU (or fractional)
    worker would run torch on one thread: 0.55x the images/s of a plain loop on the 2-core
    dev machine (docs/design.md, traps).
    """
    if torch_threads > 0:
        return torch_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // local_world_size)


def worker_device() -> torch.device:
    """The device Ray Train gave this worker, with the CUDA math settings the loop wants."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def uses_bf16(precision: str, device: torch.device) -> bool:
    """``train.precision``'s rule: bf16 when asked, or ``auto`` on CUDA; else fp32."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where :func:`uses_bf16`, else no autocast (fp32)."""
    if not uses_bf16(precision, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class TrainingParts:
    """Everything a worker trains with. ``net`` is the bare network (what checkpoints hold);
    ``model`` is what the step calls (``net``, DDP-wrapped and/or compiled)."""

    net: nn.Module
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    state: TrainState
    resumed: bool  # restored from a checkpoint of this run
    ddp: nn.parallel.DistributedDataParallel | None  # for no_sync() during accumulation

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0))


@contextlib.contextmanager
def _checkpoint_to_restore(ctx: RunContext, reported: Any) -> Iterator[tuple[str, str] | None]:
    """``(local directory, where)`` of the checkpoint this worker restores, or None.

    The driver's resume point (the newest complete checkpoint, which the data stream starts
    from), unless Ray Train hands this worker the same one (already downloaded: used as is,
    not fetched a second time) or a newer one: a worker restarted within this
    invocation after it reported a checkpoint. Never an older one: Ray resumes from the
    newest checkpoint it *registered*, which an interrupted upload can leave behind.
    """
    from pipeline.checkpoint import read_state
    from pipeline.train.resume import incomplete, local_copy

    if reported is not None:
        with reported.as_directory() as directory:
            state = read_state(directory)
            present = {p.name: p.stat().st_size for p in Path(directory).iterdir() if p.is_file()}
            problem = incomplete(state, present)
            if problem:
                log.warning("not resuming from %s: incomplete (%s)", reported.path, problem)
            elif ctx.resume is None or state.images_seen >= ctx.resume.images_seen:
                yield directory, reported.path
                return
    if ctx.resume is None:
        yield None
        return
    with local_copy(ctx.resume) as directory:
        yield str(directory), ctx.resume.location.uri


def _restore(
    net: nn.Module, ema: EMA, state: TrainState, ctx: RunContext, reported: Any, world: int
) -> tuple[Any, list, str]:
    """Load the checkpoint to restore (see above) into ``net``/``ema``/``state``.

    Returns ``(optimizer state or None, per-rank RNG states, where)``; ``where`` is "" when
    there is nothing to restore.
    """
    with _checkpoint_to_restore(ctx, reported) as found:
        if found is None:
            return None, [], ""
        directory, where = found
        loaded = load_checkpoint(directory)
    load_state_into(net, loaded.model, where, "model")
    if loaded.ema is not None:
        load_state_into(ema.module, loaded.ema, where, "EMA")
    else:
        ema.module.load_state_dict(net.state_dict())
    manifest_hash = state.manifest_hash
    saved = loaded.state
    if manifest_hash and saved.manifest_hash and saved.manifest_hash != manifest_hash:
        log.warning(
            "resuming from %s, trained on dataset %s; the dataset is now %s",
            where, saved.manifest_hash[:12], manifest_hash[:12],
        )  # fmt: skip
    for name in ("images_seen", "step", "data_epoch", "mlflow_run_id", "val_loss"):
        setattr(state, name, getattr(saved, name))
    state.manifest_hash = manifest_hash or saved.manifest_hash
    state.world_size = world
    return loaded.optimizer, loaded.rng, where


def build_parts(
    cfg: Config, ctx: RunContext, group: WorkerGroup, reported: Any = None
) -> TrainingParts:
    """The worker's network, EMA, optimizer and progress (see the module doc).

    ``reported``: ``ray.train.get_checkpoint()`` in a Train worker (None outside one).
    """
    t, device, world = cfg.train, group.device, group.world_size
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    net = to_device_layout(build_model(cfg.model, ctx.data_shape), device)  # NHWC on the CPU
    ema = EMA(net, t.ema_halflife_images, t.ema_warmup_ratio)
    state = TrainState(
        manifest_hash=ctx.manifest_hash, data_shape=list(ctx.data_shape), world_size=world,
        class_names=list(ctx.class_names),
    )  # fmt: skip
    optimizer_state, rng_saved, where = _restore(net, ema, state, ctx, reported, world)
    if not where and ctx.init is not None:
        load_state_into(net, ctx.init.model, ctx.init.source, "model")
        load_state_into(ema.module, ctx.init.ema or ctx.init.model, ctx.init.source, "EMA")
    if len(rng_saved) == world:
        set_rng_state(rng_saved[group.rank])
    else:  # fresh start, or another worker count: seeded from the position instead
        rng_seed = sample_seed(cfg.seed, state.images_seen, f"rank-{group.rank}", stream="rng")
        torch.manual_seed(rng_seed)

    model: nn.Module = net
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(net, move_to_device=False, parallel_strategy="ddp")
    ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    if t.compile:
        model = torch.compile(model)
    optimizer = adamw(
        net.parameters(), device, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay
    )
    if optimizer_state is not None:
        load_adamw_state(optimizer, optimizer_state)
    return TrainingParts(net, model, ema, optimizer, state, bool(where), ddp)
