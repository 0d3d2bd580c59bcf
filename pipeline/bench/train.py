"""``fmpipe bench train``: fmpipe training against a plain PyTorch loop, side by side.

Both sides train the same network (``cfg.model``, seeded the same) with the same global
batch (``data.batch_size``) on the same images (the training split of ``data.uri``; digits
at the configured resolution prepared into a temporary directory when ``data.uri`` is
empty), for the same number of optimizer steps, with the same torch thread count (all the
cores this process may use) and precision rule (bf16 autocast on CUDA, fp32 on CPU):

(a) baseline: a plain single-process PyTorch loop over in-memory tensors. Every training
    image is decoded once into one tensor; each step slices the next batch of a seeded
    permutation, draws ``x_0 ~ N(0, I)`` and ``t ~ U[0, 1)``, forms
    ``x_t = t x_1 + (1 - t) x_0``, takes the CFM loss ``|v(x_t, t, y) - (x_1 - x_0)|^2``
    (labels dropped to the null class at ``train.label_dropout``), backward, clips the
    gradient norm, takes an AdamW step and updates an EMA copy (``torch._foreach_lerp_``).
(b) fmpipe: :func:`pipeline.train.trainer.train` with 1 Ray Train worker fed by the Ray
    Data stream (read, decode, pair on Ray Data; ``iter_torch_batches`` in the worker),
    checkpoint, validation and grid intervals pushed beyond the run (the final checkpoint
    and validation loss still happen, after the timed steps), no MLflow.

Steady state: the first ``warmup`` optimizer steps (10, fewer for very short runs) are
excluded on both sides. For (b) the figure comes from the loop's own step timer: the loop
logs every ``warmup`` steps (``train.log_every_steps``), so its first log window is the
warm-up and the later windows are the steady state; their images/s and data-wait fraction
are combined weighted by time (read from the progress lines ``train()`` hands its
``print_fn``). (a) runs in two halves, one before and one after (b), each after its own
warm-up, and pools them: a change of load on a shared machine during the run then weighs
on both sides alike, and (a) times as many steady steps as (b). Whole-run figures include
start-up: for (a) decoding into memory and building the network, for (b) the whole
``train()`` call (Ray Train workers, the stream's first blocks, the final validation and
checkpoint).

Where CUDA is available, the same plain step is also timed on the GPU in bf16 for the
network at 32x32 and 64x64 (attention at the same U-Net levels), with the model FLOP
utilisation: forward FLOPs of one batch counted by ``torch.utils.flop_counter``, times 3
for forward + backward, divided by the step time and by the GPU's dense bf16 peak.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.bench.gpu import GpuFigures, gpu_section
from pipeline.bench.plain import (
    LoopTiming,
    PlainTrainer,
    batches,
    timed_steps,
    torch_threads,
)
from pipeline.config import Config, ConfigError
from pipeline.data.decode import to_model_range
from pipeline.data.prepare import prepare_dataset
from pipeline.data.stream import (
    DatasetInfo,
    adopt_dataset_shape,
    decode_spec,
    open_dataset,
    read_shard,
)
from pipeline.models import count_parameters
from pipeline.storage import read_whole
from pipeline.train.setup import uses_bf16

__all__ = [
    "GpuFigures",
    "TrainFigures",
    "bench_train_config",
    "load_train_images",
    "run_train_benchmark",
]

WARMUP_STEPS = 10  # optimizer steps excluded from the steady-state figures
GOAL_RATIO = 0.95  # (b) / (a)

Log = Callable[[str], None]


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --------------------------------------------------------------------------- config + data
def bench_train_config(cfg: Config, images: int, storage_path: str, data_uri: str) -> Config:
    """``cfg`` as (b) runs it: 1 worker, ``images`` images, intervals beyond the run."""
    if cfg.train.grad_accum != 1:
        raise ConfigError(
            f"train.grad_accum={cfg.train.grad_accum}: bench train compares one forward/backward "
            "pass per step with the plain loop; set train.grad_accum=1"
        )
    out = cfg.model_copy(deep=True)
    out.data.uri = data_uri
    out.train.num_workers = 1
    out.train.total_images = images
    out.train.storage_path = storage_path
    out.train.run_name = "bench-train"
    beyond = max(10 * images, 10**9)
    out.train.checkpoint_every_images = beyond
    out.train.val_every_images = beyond
    out.train.grid_every_images = beyond
    out.train.registered_model_name = ""
    return out


def _prepare_digits(cfg: Config, root: Path, log: Log) -> str:
    """Digits at ``data.resolution`` x ``data.channels`` into ``root``; returns the URI."""
    uri = str(root / "digits")
    prep = cfg.model_copy(deep=True)
    prep.prepare.source = "digits"
    prep.prepare.out = uri
    prep.prepare.resolution = cfg.data.resolution
    prep.prepare.channels = cfg.data.channels
    prep.prepare.shard_size = 500
    result = prepare_dataset(prep, log=None)
    log(
        f"data: digits {cfg.data.resolution}x{cfg.data.resolution}x{cfg.data.channels} prepared "
        f"into a temporary directory ({result.num_samples:,} images, {result.wall_seconds:.1f} s)"
    )
    return uri


def load_train_images(cfg: Config, info: DatasetInfo) -> tuple[Tensor, Tensor]:
    """Every training image decoded once: ``x_1`` float32 ``(N, C, H, W)`` in [-1, 1], labels.

    Labels are int64, -1 where the dataset is unlabelled. Bad samples are skipped.
    """
    spec = decode_spec(cfg)
    samples: list[tuple[str, int, np.ndarray]] = []
    for shard in info.shards:
        got, _ = read_shard(
            read_whole(info.filesystem, shard.path),
            shard.name,
            shard.num_samples,
            spec,
            num_classes=info.manifest.num_classes,
        )
        samples.extend(got)
    if not samples:
        raise ValueError(f"the train split of {info.uri} has no readable samples")
    x_1 = torch.from_numpy(to_model_range(np.stack([image for _, _, image in samples])))
    label = torch.tensor([lab for _, lab, _ in samples], dtype=torch.long)
    return x_1, label


# --------------------------------------------------------------------------- (b) fmpipe
_LOG_LINE = re.compile(
    r"\[train\]\s+([\d,]+) / [\d,]+ images .*?([\d.]+) img/s\s+data wait\s+([\d.]+)%"
)


@dataclass
class StreamFigures:
    steady_images_per_sec: float
    steady_data_wait: float
    run_images_per_sec: float  # the loop's own whole-run figure (step timer, warm-up included)
    run_data_wait: float
    wall_seconds: float  # the whole train() call
    images: int
    windows: int  # steady-state log windows combined
    lines: list[str] = field(default_factory=list)


def steady_state(lines: list[str], warmup_images: int) -> tuple[float, float, int] | None:
    """``(images/s, data-wait fraction, windows)`` over the log windows after the warm-up.

    Each progress line carries the window's images/s and data-wait fraction and the images
    seen at its end; a window's time is its images over its images/s.
    """
    previous = 0
    images = seconds = waited = 0.0
    windows = 0
    for line in lines:
        match = _LOG_LINE.search(line)
        if not match:
            continue
        seen = int(match.group(1).replace(",", ""))
        rate, wait = float(match.group(2)), float(match.group(3)) / 100
        count, previous = seen - previous, seen
        if seen <= warmup_images or rate <= 0 or count <= 0:
            continue
        window_seconds = count / rate
        images += count
        seconds += window_seconds
        waited += wait * window_seconds
        windows += 1
    if windows == 0:
        return None
    return images / seconds, waited / seconds, windows


def fmpipe_training(cfg: Config, warmup_images: int) -> StreamFigures:
    """Run (b): ``train()`` on the Ray Data stream with 1 worker, no MLflow."""
    from pipeline.train.trainer import train

    lines: list[str] = []
    began = time.perf_counter()
    result = train(cfg, print_fn=lines.append, track=False)
    wall = time.perf_counter() - began
    m = result.metrics
    steady = steady_state(lines, warmup_images)
    run_ips = float(m.get("images_per_sec", 0.0))
    run_wait = float(m.get("data_wait_fraction", 0.0))
    if steady is None:  # no progress lines came back: fall back to the whole-run figure
        steady = (run_ips, run_wait, 0)
    return StreamFigures(
        steady_images_per_sec=steady[0],
        steady_data_wait=steady[1],
        run_images_per_sec=run_ips,
        run_data_wait=run_wait,
        wall_seconds=wall,
        images=result.images_seen,
        windows=steady[2],
        lines=lines,
    )


# --------------------------------------------------------------------------- the benchmark
@dataclass
class TrainFigures:
    plain: list[LoopTiming]  # (a) before and after (b)
    plain_startup_seconds: float  # decode into memory + network build
    fmpipe: StreamFigures
    images: int  # per side, (b)'s total
    gpu: list[GpuFigures] = field(default_factory=list)

    @property
    def plain_images_per_sec(self) -> float:
        """(a) steady state, both halves pooled."""
        images = sum(p.timed * p.batch for p in self.plain)
        return images / sum(p.steady_seconds for p in self.plain)

    @property
    def plain_whole_images_per_sec(self) -> float:
        seconds = self.plain_startup_seconds + sum(
            p.warmup_seconds + p.steady_seconds for p in self.plain
        )
        return sum(p.images for p in self.plain) / seconds

    @property
    def ratio(self) -> float:
        return self.fmpipe.steady_images_per_sec / self.plain_images_per_sec


def run_train_benchmark(
    cfg: Config,
    images: int = 12_800,
    *,
    gpu_batch: int | None = None,
    peak_tflops: float | None = None,
    log: Log = print,
) -> TrainFigures:
    """Run (a), (b), (a) again on the same data and print the table (see the module doc).

    (a) runs in two halves, one before and one after (b), each with its own warm-up, so a
    change of load on a shared machine during the run weighs on both sides alike; its
    figure pools the two halves' steady-state steps (as many as (b) has).
    """
    from pipeline.rayenv import ensure_ray

    batch = cfg.data.batch_size
    steps = images // batch
    if steps < 2:
        raise ConfigError(
            f"--images {images} is under 2 global batches of data.batch_size={batch}; "
            f"use --images >= {2 * batch}"
        )
    images = steps * batch  # whole steps on both sides
    warmup = min(WARMUP_STEPS, max(1, steps // 4))
    timed = steps - warmup
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    threads = cfg.train.torch_threads or _cores()  # the worker's rule with 1 worker per node

    with tempfile.TemporaryDirectory(prefix="fmpipe-bench-train-") as tmp:
        root = Path(tmp)
        data_uri = cfg.data.uri.strip() or _prepare_digits(cfg, root, log)
        run_cfg = bench_train_config(cfg, images, str(root / "runs"), data_uri)
        run_cfg.train.log_every_steps = warmup  # (b)'s first log window = the warm-up
        info = open_dataset(run_cfg, "train")
        adopt_dataset_shape(run_cfg, info)  # both sides: the network train() would build

        with torch_threads(threads):
            # (a) plain loop: decode everything once, then train from memory.
            started = time.perf_counter()
            x_1, label = load_train_images(run_cfg, info)
            trainer = PlainTrainer(run_cfg, tuple(x_1.shape[1:]), device)
            startup = time.perf_counter() - started
            source = batches(x_1.to(device), label.to(device), batch, run_cfg.seed)
            plain = [timed_steps(trainer, source, warmup, (timed + 1) // 2)]

            # (b) fmpipe on Ray: 1 Ray Train worker fed by the Ray Data stream.
            started_ray = ensure_ray()
            try:
                stream = fmpipe_training(run_cfg, warmup * batch)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()

            if timed // 2:  # (a), second half
                plain.append(timed_steps(trainer, source, warmup, timed // 2))
        params = count_parameters(trainer.net)

    figures = TrainFigures(plain, startup, stream, images)
    c, r = run_cfg.data.channels, run_cfg.data.resolution
    precision = "bf16 autocast" if uses_bf16(run_cfg.train.precision, device) else "fp32"
    halves = ", ".join(f"{p.steady_images_per_sec:,.1f}" for p in plain)
    log(
        f"machine: {platform.machine()}, {_cores()} cores; torch {torch.__version__}, "
        f"{threads} torch threads on both sides; {device.type}, {precision}"
    )
    log(
        f"model: {run_cfg.model.kind} ({params:,} parameters) on {c}x{r}x{r} images of "
        f"{data_uri if cfg.data.uri.strip() else 'digits'} ({len(x_1):,} train images); "
        f"global batch {batch}; {steps} steps = {images:,} images"
    )
    log(
        f"steady state: {timed} steps per side after {warmup} warm-up steps; (a) ran before "
        f"and after (b) (steady images/s of the halves: {halves}); (b): 1 Ray Train worker, "
        f"{run_cfg.train.cpus_per_worker:g} CPU, fed by the Ray Data stream"
    )
    log("")
    log(f"{'':<46} {'images/s':>9} {'whole run':>10} {'data wait':>10}")
    log(
        f"{'(a) plain PyTorch loop, in-memory tensors':<46} "
        f"{figures.plain_images_per_sec:>9,.1f} {figures.plain_whole_images_per_sec:>10,.1f} "
        f"{'-':>10}"
    )
    log(
        f"{'(b) fmpipe train, 1 worker + Ray Data stream':<46} "
        f"{stream.steady_images_per_sec:>9,.1f} {images / stream.wall_seconds:>10,.1f} "
        f"{100 * stream.steady_data_wait:>9.1f}%"
    )
    log(
        f"ratio b/a: {figures.ratio:.3f} (goal >= {GOAL_RATIO}); "
        f"data wait of (b): {100 * stream.steady_data_wait:.1f}% of step time"
    )
    log(
        f"whole run = images / wall time with start-up: (a) decode + network build "
        f"{startup:.1f} s; (b) the train() call, {stream.wall_seconds:.1f} s (Ray Train "
        f"controller and worker, stream start, final validation + checkpoint). "
        f"(b)'s loop over all its steps: "
        f"{stream.run_images_per_sec:,.1f} images/s, data wait {100 * stream.run_data_wait:.1f}%"
    )
    if stream.windows == 0:
        log("note: no progress lines came back from (b); its steady figure is the whole loop's")
    figures.gpu = gpu_section(run_cfg, gpu_batch or batch, peak_tflops, log)
    return figures
