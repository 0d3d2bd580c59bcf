"""The training loop: one function whose keyword arguments are every knob (EDM2 style).

:func:`training_loop` runs in every Ray Train worker (:func:`train_loop_per_worker` is the
``TorchTrainer`` entry point; it calls ``training_loop(**config)``). Per optimizer step:

    for each of grad_accum micro-batches (batch_size / (workers * grad_accum) rows each):
        x_t = t * x_1 + (1 - t) * x_0;  loss = || v(x_t, t, y) - (x_1 - x_0) ||^2
        backward (DDP all-reduces the gradients on the last micro-batch only)
    clip the global gradient norm; AdamW step at lr * lr_factor(images_seen); EMA update

Counting. Durations and intervals are in images, counted globally: every step consumes
``batch_size`` images whatever the worker count, so a config means the same run on 1 or
64 workers. The run ends at exactly ``total_images``: when ``total_images`` is not a
multiple of ``batch_size``, the last step is partial: only the first
``total_images - images_seen`` rows of its global batch count (their losses are kept,
the others masked to 0) and its lr, EMA decay and images-seen use that count. Interval
events (log, validation, grid, checkpoint) fire on the step whose images-seen count
crosses a multiple of their interval, and all of them fire at the end.

Global batch layout (what makes 1 and N workers the same run): the step's global batch is
``[micro j][rank k][row]``; rank ``k``'s ``j``-th micro-batch is global rows
``j * batch_size / grad_accum + k * micro + [0, micro)``. Label dropout (to the null class,
for classifier-free guidance) is drawn per global row from ``(seed, images_seen)``, so it
does not depend on the worker count either.

Checkpoints go through ``ray.train.report`` from every rank (a barrier): rank 0 writes the
directory (:mod:`pipeline.checkpoint`) and passes it, the others pass None. Resume:
``ray.train.get_checkpoint()`` (Ray Train finds it after a worker restart, or when the
same ``name`` + ``storage_path`` is run again) restores model, EMA, optimizer, images
seen, step, data epoch, per-rank RNG states and the MLflow run id, and training continues
to the same total in the same MLflow run.

MLflow is written from rank 0 only (:class:`pipeline.tracking.Tracker`): config params at
start; every ``log_every_steps`` the loss, lr, gradient norm, images/s and the fraction of
step time spent waiting for data (MLflow step = images seen); ``val_loss`` on the EMA
weights; sample grids of the EMA at fixed seeds; at the end the final checkpoint as run
artifacts under ``checkpoint/images_<N>`` and, with ``registered_model_name``, a registered
model version tagged with the manifest hash, images seen and validation loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.checkpoint import (
    TrainState,
    bare_module,
    load_checkpoint,
    load_state_into,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.config import Config, ModelConfig, build_config
from pipeline.data.coupling import sample_generator, sample_seed
from pipeline.flow import CondOTPath, cfm_loss_per_sample, solve_ode
from pipeline.malloc import keep_freed_memory
from pipeline.models import build_model, guided_velocity, to_device_layout
from pipeline.optim import adamw, load_adamw_state, lr_factor
from pipeline.train.data import BatchSource, RayDataSource, SourceContext, ValSet
from pipeline.train.ema import EMA
from pipeline.train.validate import model_labels, validation_loss

__all__ = ["checkpoint_dir_name", "micro_batch_size", "train_loop_per_worker", "training_loop"]

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACTS = "checkpoint"  # MLflow artifact folder of the final checkpoint
GRID_COLUMNS = 8  # samples per row of the sample grid (one row per class when conditional)


def micro_batch_size(batch_size: int, num_workers: int, grad_accum: int) -> int:
    """Rows per worker per micro-batch; the global batch must split evenly."""
    parts = num_workers * grad_accum
    if batch_size % parts:
        raise ValueError(
            f"data.batch_size={batch_size} (the global batch) must be divisible by "
            f"train.num_workers * train.grad_accum = {num_workers} * {grad_accum} = {parts}"
        )
    return batch_size // parts


def checkpoint_dir_name(images_seen: int) -> str:
    """Name of the checkpoint directory in storage: sortable by images seen."""
    return f"checkpoint_{images_seen:012d}"


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def train_loop_per_worker(config: Mapping[str, Any]) -> None:
    """The ``TorchTrainer`` entry point: ``training_loop(**config)``."""
    training_loop(**config)


# --------------------------------------------------------------------------- distributed
class _Dist:
    """The worker's place in the run, and the few collectives the loop needs."""

    def __init__(self, device: torch.device) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_world_size = max(1, context.get_local_world_size())
        self.device = device
        self.on = self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.on:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        if self.on:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _report(metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


# --------------------------------------------------------------------------- helpers
def _threads(torch_threads: int, local_world_size: int) -> int:
    """torch threads: the knob, else this node's cores shared by its workers (>= 1)."""
    if torch_threads > 0:
        return torch_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // local_world_size)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _Progress:
    """Rank 0's line to the driver (a Ray queue), best effort: never blocks training."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def send(self, **fields: Any) -> None:
        if self.queue is None:
            return
        with contextlib.suppress(Exception):
            self.queue.actor.put_nowait.remote(fields)


def _open_tracker(tracking: Mapping[str, Any] | None, config: Config, enabled: bool) -> Any:
    """The MLflow tracker for rank 0 (a disabled one elsewhere or when tracking is off)."""
    from pipeline.tracking import Tracker

    if not enabled or not tracking:
        return Tracker.disabled()
    cfg = config.model_copy(deep=True)
    cfg.tracking.uri = str(tracking["uri"])
    previous = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the driver resolved it already
    try:
        return Tracker.start(
            cfg,
            experiment=str(tracking.get("experiment") or cfg.tracking.experiment),
            run_name=str(tracking.get("run_name") or cfg.train.run_name),
            run_id=tracking.get("run_id") or None,
        )
    finally:
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous


@torch.no_grad()
def sample_grid(
    model: nn.Module, data_shape: Sequence[int], *, seed: int, steps: int,
    guidance_scale: float = 1.0, columns: int = GRID_COLUMNS, device: torch.device | str = "cpu",
) -> tuple[Tensor, int]:  # fmt: skip
    """EMA samples at fixed seeds: one row per class (conditional) or ``columns`` rows.

    Noise comes from ``(seed, "grid")`` alone, so grids of successive evaluations show the
    same starting points. Euler with ``steps`` steps. Returns ``(images (N,C,H,W), nrow)``.
    """
    num_classes = int(getattr(bare_module(model), "num_classes", 0))
    rows = num_classes if num_classes > 0 else columns
    gen = sample_generator(seed, 0, "grid", stream="grid")
    x_0 = torch.randn((rows * columns, *data_shape), generator=gen).to(device)
    label = None
    if num_classes > 0:
        label = torch.arange(num_classes, device=device).repeat_interleave(columns)
    was_training = model.training
    model.eval()
    try:
        solution = solve_ode(
            lambda x, t: guided_velocity(model, x, t, label, guidance_scale).float(),
            x_0,
            method="euler",
            steps=steps,
        )
    finally:
        model.train(was_training)
    return solution.x_1.clamp(-1, 1).cpu(), columns


# --------------------------------------------------------------------------- the loop
def training_loop(
    *,
    config: Mapping[str, Any],  # the resolved Config as a dict: checkpoints and MLflow params
    data_shape: Sequence[int],  # (C, H, W) of one training image
    model_kwargs: Mapping[str, Any] | None = None,  # ModelConfig fields; None: config["model"]
    seed: int = 0,  # network init, label dropout, per-rank RNG, grid noise
    total_images: int = 200_000,  # training duration in images seen (global)
    batch_size: int = 128,  # global batch: images per optimizer step, split over workers
    grad_accum: int = 1,  # micro-batches per optimizer step (the global batch stays fixed)
    lr: float = 2e-4,  # AdamW base learning rate
    lr_schedule: str = "constant",  # after warm-up: constant | cosine (to 0 at total_images)
    warmup_images: int = 10_000,  # linear lr warm-up from 0, in images
    weight_decay: float = 0.0,  # AdamW decoupled weight decay
    adam_betas: Sequence[float] = (0.9, 0.999),  # AdamW betas
    grad_clip: float = 1.0,  # max global gradient norm; 0 disables clipping
    ema_halflife_images: float = 50_000,  # EMA half-life in images
    ema_warmup_ratio: float = 0.05,  # EMA half-life <= ratio * images_seen early on; 0: off
    label_dropout: float = 0.1,  # rate of labels replaced by the null class (conditional only)
    precision: str = "auto",  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False,  # torch.compile the (DDP-wrapped) network
    torch_threads: int = 0,  # torch intra-op threads per worker; 0: node cores / local workers
    batch_source: BatchSource | None = None,  # None: Ray Train dataset "train" (RayDataSource)
    coupling: str = "independent",  # x_0 <-> x_1 pairing per micro-batch: independent | ot
    ot_per_class: bool = False,  # with ot: assign within each label only
    prefetch_batches: int = 2,  # iter_torch_batches prefetch (RayDataSource only)
    val_set: ValSet | None = None,  # fixed validation draws; None: no validation loss
    val_batch_size: int = 256,  # rows per forward pass of the validation loss
    manifest_hash: str = "",  # training split's Manifest.content_hash(), saved and tagged
    checkpoint_every_images: int = 50_000,  # checkpoint (ray.train.report) interval
    log_every_steps: int = 20,  # metrics interval in optimizer steps
    val_every_images: int = 50_000,  # validation-loss interval
    grid_every_images: int = 100_000,  # sample-grid interval
    grid_steps: int = 32,  # Euler steps of the sample grid
    grid_guidance_scale: float = 1.0,  # classifier-free guidance of the grid (conditional)
    tracking: dict | None = None,  # MLflow {uri, run_id, experiment, run_name}; None: off
    registered_model_name: str = "",  # MLflow registry name for the final checkpoint; "": none
    progress_queue: Any = None,  # ray.util.queue.Queue for the driver's progress lines
) -> dict[str, Any]:
    """Train to ``total_images``; returns rank 0's final metrics (see the module doc)."""
    import ray.train
    import ray.train.torch

    cfg = build_config(dict(config))
    model_cfg = ModelConfig(**(dict(model_kwargs) if model_kwargs else cfg.model.model_dump()))
    device = ray.train.torch.get_device()
    if not isinstance(device, torch.device):
        device = torch.device(device)
    ws = _Dist(device)
    rank, world = ws.rank, ws.world_size
    torch.set_num_threads(_threads(torch_threads, ws.local_world_size))
    keep_freed_memory()  # each step reuses the last one's activation pages (pipeline.malloc)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    micro = micro_batch_size(batch_size, world, grad_accum)
    data_shape = tuple(int(s) for s in data_shape)

    # ---- network, EMA, optimizer; then the checkpoint, if resuming
    torch.manual_seed(seed)  # same initial weights on every rank
    net = to_device_layout(build_model(model_cfg, data_shape), device)  # NHWC on the CPU
    num_classes = int(getattr(net, "num_classes", 0))
    ema = EMA(net, ema_halflife_images, ema_warmup_ratio)
    state = TrainState(manifest_hash=manifest_hash, data_shape=list(data_shape), world_size=world)
    rng_saved: list[dict[str, Any]] = []
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            loaded = load_checkpoint(directory)
        where = checkpoint.path
        load_state_into(net, loaded.model, where, "model")
        if loaded.ema is not None:
            load_state_into(ema.module, loaded.ema, where, "EMA")
        else:
            ema.module.load_state_dict(bare_module(net).state_dict())
        optimizer_state = loaded.optimizer
        rng_saved = loaded.rng
        state = loaded.state
        state.world_size = world
        if manifest_hash and state.manifest_hash and state.manifest_hash != manifest_hash:
            log.warning(
                "resuming from %s, trained on dataset %s; the dataset is now %s",
                where, state.manifest_hash[:12], manifest_hash[:12],
            )  # fmt: skip
        state.manifest_hash = manifest_hash or state.manifest_hash
    if len(rng_saved) == world:
        set_rng_state(rng_saved[rank])
    else:  # fresh start, or another worker count: seeded from the position instead
        torch.manual_seed(sample_seed(seed, state.images_seen, f"rank-{rank}", stream="rng"))

    model: nn.Module = net
    if world > 1:
        model = ray.train.torch.prepare_model(net, move_to_device=False, parallel_strategy="ddp")
    if compile:
        model = torch.compile(model)
    optimizer = adamw(net.parameters(), device, lr=lr, betas=adam_betas, weight_decay=weight_decay)
    if optimizer_state is not None:
        load_adamw_state(optimizer, optimizer_state)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel) or isinstance(
        getattr(model, "_orig_mod", None), nn.parallel.DistributedDataParallel
    )
    ddp_module = (
        model
        if isinstance(model, nn.parallel.DistributedDataParallel)
        else getattr(model, "_orig_mod", None)
    )

    # ---- tracking (rank 0)
    tracker = _open_tracker(tracking, cfg, enabled=rank == 0)
    progress = _Progress(progress_queue if rank == 0 else None)
    if rank == 0 and tracker.enabled:
        tracker.log_config(cfg)  # params (scrubbed) + config.yaml; unchanged ones skipped on resume
        tracker.set_tags({"fmpipe.job": "train", "fmpipe.manifest_hash": manifest_hash})
        state.mlflow_run_id = tracker.run_id
    progress.send(kind="start", images_seen=state.images_seen, total_images=total_images,
                  world_size=world, micro_batch=micro, resumed=checkpoint is not None,
                  mlflow_run_id=state.mlflow_run_id)  # fmt: skip

    # ---- data
    source = batch_source or RayDataSource(
        coupling=coupling, ot_per_class=ot_per_class, prefetch_batches=prefetch_batches
    )
    ctx = SourceContext(
        rank=rank, world_size=world, micro_batch=micro, grad_accum=grad_accum,
        batch_size=batch_size, images_seen=state.images_seen, data_epoch=state.data_epoch,
    )  # fmt: skip
    batches: Iterator[dict[str, Tensor]] = iter(source.batches(ctx))
    path = CondOTPath()
    params = [p for p in net.parameters() if p.requires_grad]
    chunk = batch_size // grad_accum

    # ---- accumulators of the log window and of the whole run
    win_loss = win_rows = win_time = win_wait = 0.0
    win_images = 0
    run_time = run_wait = 0.0
    run_images = 0
    last: dict[str, Any] = {"loss": math.nan, "lr": 0.0, "grad_norm": math.nan}
    data_epoch = state.data_epoch

    def step_metrics() -> dict[str, float]:
        # The loss sums and the gradient norm stay on the device between log steps: reading
        # them every step would make the host wait for the GPU once per step.
        loss_sum, rows = ws.sum([float(win_loss), float(win_rows)])
        out = {
            "loss": loss_sum / max(rows, 1.0),
            "lr": last["lr"],
            "grad_norm": float(last["grad_norm"]),
            "images_per_sec": win_images / win_time if win_time > 0 else 0.0,
            "data_wait_fraction": win_wait / win_time if win_time > 0 else 0.0,
            "data_epoch": float(data_epoch),
        }
        last["loss"] = out["loss"]
        return out

    def run_validation() -> float | None:
        if rank != 0 or val_set is None:
            return None
        value = validation_loss(ema.module, val_set, batch_size=val_batch_size, device=device)
        tracker.log_metrics({"val_loss": value}, step=state.images_seen)
        progress.send(kind="val", images_seen=state.images_seen, val_loss=value)
        state.val_loss = value
        return value

    def log_grid() -> None:
        if rank != 0 or not tracker.enabled:
            return
        from pipeline.viz import image_grid

        images, nrow = sample_grid(
            ema.module, data_shape, seed=seed, steps=grid_steps,
            guidance_scale=grid_guidance_scale, device=device,
        )  # fmt: skip
        tracker.log_image(
            image_grid(images, nrow=nrow, scale=2), f"grids/images_{state.images_seen:012d}.png"
        )

    def save_and_report(final: bool) -> dict[str, Any]:
        state.data_epoch = ws.min_int(data_epoch)
        rngs = ws.gather(rng_state())
        metrics: dict[str, Any] = {
            "images_seen": state.images_seen,
            "step": state.step,
            "data_epoch": state.data_epoch,
            "loss": last["loss"],
            "val_loss": state.val_loss,
            "images_per_sec": run_images / run_time if run_time > 0 else 0.0,
            "data_wait_fraction": run_wait / run_time if run_time > 0 else 0.0,
            "train_seconds": run_time,
            "mlflow_run_id": state.mlflow_run_id,
            "done": final,
        }
        tmp = None
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="fmpipe-ckpt-")
            save_checkpoint(
                tmp, model=net, ema=ema.module, optimizer=optimizer, state=state,
                config=cfg, rng=rngs,
            )  # fmt: skip
            if final and tracker.enabled:
                artifact_path = f"{CHECKPOINT_ARTIFACTS}/images_{state.images_seen:012d}"
                tracker.log_artifacts(tmp, artifact_path)
                metrics["checkpoint_artifacts"] = artifact_path
                if registered_model_name:
                    tags = {
                        "manifest_hash": state.manifest_hash,
                        "images_seen": state.images_seen,
                        "val_loss": "" if state.val_loss is None else f"{state.val_loss:.6g}",
                        "run_name": cfg.train.run_name,
                    }
                    version = tracker.register_model_version(
                        registered_model_name, artifact_path, tags
                    )
                    metrics["registered_model_name"] = registered_model_name
                    metrics["registered_version"] = version
            progress.send(kind="checkpoint", images_seen=state.images_seen, final=final)
        try:
            _report(metrics, tmp, checkpoint_dir_name(state.images_seen))
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return metrics

    # ---- already done (a finished run run again): nothing to train
    if state.images_seen >= total_images:
        metrics = {
            "images_seen": state.images_seen, "step": state.step, "data_epoch": state.data_epoch,
            "val_loss": state.val_loss, "mlflow_run_id": state.mlflow_run_id, "done": True,
            "images_per_sec": 0.0, "data_wait_fraction": 0.0, "train_seconds": 0.0,
        }  # fmt: skip
        progress.send(kind="done", images_seen=state.images_seen, already=True)
        _report(metrics, None, None)
        return metrics

    model.train()
    final_metrics: dict[str, Any] = {}
    while state.images_seen < total_images:
        t_start = time.perf_counter()
        wait = 0.0
        before = state.images_seen
        n_step = min(batch_size, total_images - before)  # partial only on the last step
        lr_now = lr * lr_factor(before, total_images, warmup_images, lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        drop = None
        if num_classes > 0 and label_dropout > 0:
            gen = torch.Generator().manual_seed(
                sample_seed(seed, before, "", stream="label-dropout")
            )
            drop = torch.rand(batch_size, generator=gen) < label_dropout
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        step_rows = torch.zeros((), device=device)
        for j in range(grad_accum):
            t_wait = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"rank {rank}: the data stream ended at {before} of {total_images} images"
                ) from None
            wait += time.perf_counter() - t_wait
            x_1 = batch["x_1"].to(device, non_blocking=True)
            x_0 = batch["x_0"].to(device, non_blocking=True).float()
            t = batch["t"].to(device, non_blocking=True).float()
            if len(x_1) != micro:
                raise RuntimeError(f"rank {rank}: got a batch of {len(x_1)} rows, expected {micro}")
            if "epoch" in batch:
                data_epoch = int(batch["epoch"].min())
            rows = j * chunk + rank * micro + torch.arange(micro)
            used = (rows < n_step).to(device=device, dtype=torch.float32)
            label = None
            if num_classes > 0:
                label = model_labels(batch["label"].long(), num_classes)
                if drop is not None:
                    label = torch.where(drop[rows], torch.full_like(label, num_classes), label)
                label = label.to(device, non_blocking=True)
            sync = contextlib.nullcontext()
            if is_ddp and j < grad_accum - 1 and ddp_module is not None:
                sync = ddp_module.no_sync()
            with sync:
                sample = path.sample(x_0=x_0, x_1=x_1, t=t)
                with _autocast(precision, device):
                    velocity = model(sample.x_t, t, label)
                per_sample = cfm_loss_per_sample(velocity.float(), x_0, x_1)
                # DDP averages gradients over ranks: scale by world / n_step so the step's
                # gradient is the mean over the n_step counted rows of the global batch.
                loss = (per_sample * used).sum() * (world / n_step)
                loss.backward()
            step_loss += (per_sample.detach() * used).sum()
            step_rows += used.sum()
        for p in params:  # as in EDM2: a rare inf/nan gradient element must not poison the run
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
        max_norm = grad_clip if grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        optimizer.step()
        state.images_seen = before + n_step
        state.step += 1
        ema.update(net, state.images_seen, n_step)
        elapsed = time.perf_counter() - t_start

        win_loss += step_loss
        win_rows += step_rows
        win_time += elapsed
        win_wait += wait
        win_images += n_step
        run_time += elapsed
        run_wait += wait
        run_images += n_step
        last["lr"], last["grad_norm"] = lr_now, grad_norm

        final = state.images_seen >= total_images
        if state.step % log_every_steps == 0 or final:
            metrics = step_metrics()
            if rank == 0:
                tracker.log_metrics(metrics, step=state.images_seen)
                progress.send(kind="log", images_seen=state.images_seen,
                              total_images=total_images, step=state.step, **metrics)  # fmt: skip
            win_loss = win_rows = win_time = win_wait = 0.0
            win_images = 0
        if _crossed(before, state.images_seen, val_every_images) or final:
            run_validation()
        if _crossed(before, state.images_seen, grid_every_images) or final:
            log_grid()
        if _crossed(before, state.images_seen, checkpoint_every_images) or final:
            final_metrics = save_and_report(final)

    if rank == 0:
        progress.send(kind="done", images_seen=state.images_seen, already=False)
    return final_metrics
