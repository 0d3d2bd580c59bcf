"""``fmpipe bench sample``: the sampler and the Ray batch-inference job against a plain loop.

One run, one network (the model's EMA weights, as ``fmpipe sample`` uses them), one solver
and step count, ``N`` samples in compute blocks of ``B`` (the fmpipe block size: 50 on CPU,
500 on CUDA), labels cycling ``i % classes`` for a conditional model:

(a) baseline: a plain loop in this process calling the network through
    ``torchdiffeq.odeint`` with the same method on the same fixed grid
    (``t = linspace(0, 1, steps + 1)``; ``heun`` is torchdiffeq's ``heun2``, ``dopri5`` the
    adaptive one with the same tolerances), batch = ``B``, noise from ``torch.randn``, the
    network as loaded.
(b) fmpipe's sampler in this process: :func:`pipeline.sample.sampler.integrate_range` over
    the same blocks (per-sample seeded noise, fmpipe's own solvers), the network prepared
    as the actors prepare it (:func:`pipeline.sample.sampler.prepare_model`: channels-last
    on the CPU).
(c) ``fmpipe sample`` end to end: :func:`pipeline.sample.generate` on a Ray Data actor pool
    of ``A`` actors, PNG encoding and WebDataset shards written to a temporary directory,
    the manifest and grid included (no MLflow); timed around the whole call.

(a) and (b) use the torch thread count each of (c)'s actors gets (``fmpipe sample``'s own
rule: the Ray CPUs minus half a CPU, shared by the actors), so ``c / (b * A)`` is the
fraction of ``A`` independent in-process samplers the Ray job delivers. Both run after one
untimed block each, alternating block by block, half of their blocks before (c) and half
after, so load changes on a shared machine weigh on all three alike. This process keeps
freed heap memory (:func:`pipeline.rayenv.keep_freed_memory`) as each of (c)'s actors does,
so (a), (b) and (c) run with the same allocator behaviour.

Quality versus NFE: for each solver setting, ``n`` samples from fmpipe's sampler (quantised
to uint8 as the shards hold them) against ``n`` real images of the model's training split;
the figure is the sliced Wasserstein-2 distance (512 random directions, pixels in
[-1, 1]). The floor is the same distance between two disjoint real subsets of ``n`` images:
what a perfect model would score at this sample size. ``n = min(N, real images / 2)``
(``--quality-samples`` sets another ``n``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pipeline.bench.plain import torch_threads
from pipeline.config import Config
from pipeline.eval.metrics import sliced_wasserstein2
from pipeline.flow.solvers import is_adaptive
from pipeline.rayenv import keep_freed_memory
from pipeline.sample.determinism import default_block_size
from pipeline.sample.sampler import SamplerSettings, integrate_range, prepare_model
from pipeline.sample.source import ModelSource, training_data_uri

if TYPE_CHECKING:
    from pipeline.sample.job import SampleResult

__all__ = [
    "QUALITY_SETTINGS",
    "TORCHDIFFEQ_METHODS",
    "BenchSampleError",
    "SampleFigures",
    "odeint_block",
    "run_sample_benchmark",
]

GOAL_B_OVER_A = 1.0
GOAL_C_OVER_BA = 0.9
QUALITY_SETTINGS: tuple[tuple[str, int | None], ...] = (
    ("euler", 2),
    ("euler", 4),
    ("euler", 8),
    ("euler", 16),
    ("euler", 32),
    ("midpoint", 8),
    ("heun", 8),
    ("dopri5", None),
)
# fmpipe solver -> torchdiffeq method (heun = explicit trapezoid = torchdiffeq's heun2)
TORCHDIFFEQ_METHODS = {
    "euler": "euler",
    "midpoint": "midpoint",
    "heun": "heun2",
    "rk4": "rk4",
    "dopri5": "dopri5",
}
SHARDS_PER_ACTOR = 4  # (c)'s output is cut so that each actor gets about this many shards

Log = Callable[[str], None]


class BenchSampleError(ValueError):
    """The benchmark cannot run as asked (a missing model, most often). One line."""


@contextlib.contextmanager
def _home(path: Path) -> Iterator[None]:
    """``$FMPIPE_HOME`` pointed at ``path``: (c)'s grid PNG stays in the temporary directory."""
    previous = os.environ.get("FMPIPE_HOME")
    os.environ["FMPIPE_HOME"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FMPIPE_HOME", None)
        else:
            os.environ["FMPIPE_HOME"] = previous


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the model
def load_source(cfg: Config, uri: str) -> ModelSource:
    """:func:`load_model_source`, with a one-line error that says what to do."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.registry import ModelNotFound
    from pipeline.sample.source import load_model_source
    from pipeline.storage import StorageError

    try:
        return load_model_source(cfg, uri)
    except (ModelNotFound, CheckpointError, StorageError) as exc:
        reason = " ".join(str(exc).split())
        raise BenchSampleError(
            f"model {uri} is not available ({reason}); run `make demo` first, or pass "
            "--model models:/<name>@<alias> | models:/<name>/<version> | a checkpoint directory"
        ) from None


def _settings(cfg: Config, source: ModelSource, block: int, solver: str, steps: int | None):
    """The sample job's own settings (:func:`pipeline.sample.plan.sampler_settings`) with
    this row's solver and step count."""
    from pipeline.sample.plan import sampler_settings

    job = sampler_settings(cfg, source, None, block)
    return dataclasses.replace(job, solver=solver, steps=steps or job.steps)


# --------------------------------------------------------------------------- (a) torchdiffeq
def odeint_block(
    net: nn.Module,
    x_0: Tensor,
    label: Tensor | None,
    settings: SamplerSettings,
) -> tuple[Tensor, int]:
    """(a) for one batch: ``x_1`` and the NFE of ``torchdiffeq.odeint`` on the fixed grid."""
    from torchdiffeq import odeint

    batch = x_0.shape[0]
    w = float(settings.guidance_scale)
    guided = label is not None and w != 1.0
    null = None
    if guided:
        null = torch.full_like(label, settings.num_classes)
    nfe = 0

    def velocity(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        t_b = t.expand(batch)
        if not guided:
            return net(x, t_b, label)
        v = net(torch.cat([x, x]), torch.cat([t_b, t_b]), torch.cat([label, null]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + w * (v_cond - v_uncond)

    method = TORCHDIFFEQ_METHODS[settings.solver]
    if is_adaptive(settings.solver):
        grid = torch.tensor([0.0, 1.0], device=x_0.device)
        out = odeint(velocity, x_0, grid, method=method, rtol=settings.rtol, atol=settings.atol)
    else:
        grid = torch.linspace(0.0, 1.0, settings.steps + 1, device=x_0.device)
        out = odeint(velocity, x_0, grid, method=method)
    return out[-1], nfe


@dataclass
class SpeedRow:
    seconds: float = 0.0
    nfe: int = 0  # summed over blocks
    blocks: int = 0

    def per_sec(self, n: int) -> float:
        return n / self.seconds if self.seconds > 0 else 0.0

    def __add__(self, other: SpeedRow) -> SpeedRow:
        return SpeedRow(
            self.seconds + other.seconds, self.nfe + other.nfe, self.blocks + other.blocks
        )

    @property
    def nfe_per_sample(self) -> float:
        return self.nfe / self.blocks if self.blocks else 0.0


def in_process_speed(
    net: nn.Module,
    sampler_net: nn.Module,
    settings: SamplerSettings,
    num_samples: int,
    device: torch.device,
) -> tuple[SpeedRow, SpeedRow]:
    """(a) on ``net`` (as loaded) and (b) on ``sampler_net`` (:func:`prepare_model`: as the
    actors run it), over the blocks covering ``[0, num_samples)``, alternating block by block.
    """
    from pipeline.sample.determinism import block_ranges, sample_labels

    block = settings.block_size
    shape = tuple(settings.data_shape)
    gen = torch.Generator().manual_seed(settings.seed)
    a, b = SpeedRow(), SpeedRow()

    def run_a(start: int) -> int:
        x_0 = torch.randn((block, *shape), generator=gen).to(device)
        labels = sample_labels(range(start, start + block), settings.num_classes, settings.label)
        if labels is not None:
            labels = labels.to(device)
        with torch.inference_mode():
            x_1, nfe = odeint_block(net, x_0, labels, settings)
            x_1.to("cpu")
        return nfe

    def run_b(start: int) -> int:
        _, nfes = integrate_range(sampler_net, start, start + block, settings, device)
        return sum(nfes)

    run_a(0)  # warm-up, untimed
    run_b(0)
    for k, (start, _) in enumerate(block_ranges(0, num_samples, block)):
        order = ((a, run_a), (b, run_b)) if k % 2 == 0 else ((b, run_b), (a, run_a))
        for row, fn in order:
            _sync(device)
            began = time.perf_counter()
            nfe = fn(start)
            _sync(device)
            row.seconds += time.perf_counter() - began
            row.nfe += nfe
            row.blocks += 1
    return a, b


# --------------------------------------------------------------------------- (c) Ray job
def shard_size_for(num_samples: int, block: int, actors: int) -> int:
    """Whole blocks per shard, about :data:`SHARDS_PER_ACTOR` shards per actor."""
    return max(1, math.ceil(num_samples / (block * SHARDS_PER_ACTOR * actors))) * block


def ray_job_speed(
    cfg: Config, source: ModelSource, block: int, root: Path
) -> tuple[float, SampleResult, int]:
    """(c): ``(wall seconds of generate(), its result, actors used)``."""
    from pipeline.sample.job import generate

    run = cfg.model_copy(deep=True)
    n = run.sample.num_samples
    actors = run.sample.num_actors
    run.sample.shard_size = shard_size_for(n, block, actors)
    run.sample.out = str(root / "samples")
    with _home(root / "home"):
        began = time.perf_counter()
        result = generate(run, source=source, block_size=block, track=False, log_line=None)
        wall = time.perf_counter() - began
    if result.num_samples != n:
        raise RuntimeError(f"(c) wrote {result.num_samples} samples, expected {n}")
    return wall, result, min(actors, result.shards)


# --------------------------------------------------------------------------- quality
def real_images(cfg: Config, data_uri: str, data_shape: tuple[int, ...]) -> Tensor:
    """The training split of ``data_uri`` at the model's ``(C, H, W)``, in [-1, 1]."""
    from pipeline.bench.train import load_train_images
    from pipeline.data.stream import open_dataset

    qcfg = cfg.model_copy(deep=True)
    qcfg.data.uri = data_uri
    qcfg.data.channels = int(data_shape[0])
    qcfg.data.resolution = int(data_shape[1])
    x, _ = load_train_images(qcfg, open_dataset(qcfg, "train"))
    return x


def as_written(x: Tensor) -> Tensor:
    """Samples as the shards hold them: uint8, read back into [-1, 1]."""
    from pipeline.data.decode import to_model_range
    from pipeline.viz import to_uint8

    return torch.from_numpy(to_model_range(to_uint8(x)))


@dataclass
class QualityRow:
    name: str
    nfe: float
    sw2: float
    seconds: float


def quality_table(
    net: nn.Module,
    cfg: Config,
    source: ModelSource,
    real: Tensor,
    num_samples: int,
    block: int,
    device: torch.device,
    seed: int = 0,
) -> tuple[int, float, list[QualityRow]]:
    """``(n, floor, rows)``: sliced W2 per setting of :data:`QUALITY_SETTINGS` (module doc)."""
    n = min(num_samples, len(real) // 2)
    if n < 2:
        raise ValueError(f"only {len(real)} real images: need at least 4 for the floor")
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    real_a, real_b = real[perm[:n]], real[perm[n : 2 * n]]
    floor = sliced_wasserstein2(real_a, real_b)
    rows = []
    for solver, steps in QUALITY_SETTINGS:
        settings = _settings(cfg, source, block, solver, steps)
        began = time.perf_counter()
        x_1, nfes = integrate_range(net, 0, n, settings, device)
        seconds = time.perf_counter() - began
        name = f"{solver} {steps}" if steps else solver
        sw2 = sliced_wasserstein2(as_written(x_1), real_a)
        rows.append(QualityRow(name, sum(nfes) / len(nfes), sw2, seconds))
    return n, floor, rows


# --------------------------------------------------------------------------- the benchmark
@dataclass
class SampleFigures:
    num_samples: int
    actors: int
    threads: int
    plain: SpeedRow
    sampler: SpeedRow
    ray_wall_seconds: float
    ray_job_samples_per_sec: float
    quality_n: int = 0
    floor: float = math.nan
    quality: list[QualityRow] = field(default_factory=list)
    n_ab: int = 0  # samples (a) and (b) each integrated (whole blocks); 0: num_samples

    @property
    def a(self) -> float:
        return self.plain.per_sec(self.n_ab or self.num_samples)

    @property
    def b(self) -> float:
        return self.sampler.per_sec(self.n_ab or self.num_samples)

    @property
    def c(self) -> float:
        return self.num_samples / self.ray_wall_seconds

    @property
    def b_over_a(self) -> float:
        return self.b / self.a

    @property
    def c_over_ba(self) -> float:
        return self.c / (self.b * self.actors)


def run_sample_benchmark(
    cfg: Config,
    model_uri: str,
    *,
    data_uri: str | None = None,
    quality_samples: int | None = None,
    speed_samples: int | None = None,
    log: Log = print,
) -> SampleFigures:
    """Run (a), (b), (c) and the quality table; print them (see the module doc)."""
    from pipeline.rayenv import ensure_ray
    from pipeline.sample.plan import SampleJobError, validate_settings
    from pipeline.sample.pool import actor_resources
    from pipeline.sample.sampler import pick_device

    s = cfg.sample
    if s.solver not in TORCHDIFFEQ_METHODS:
        raise BenchSampleError(
            f"--solver {s.solver}: choose one of {', '.join(TORCHDIFFEQ_METHODS)}"
        )
    source = load_source(cfg, model_uri)
    try:
        validate_settings(cfg, source)
    except SampleJobError as exc:
        raise BenchSampleError(str(exc)) from None
    n = s.num_samples
    block = default_block_size("cuda" if s.use_gpu else "cpu")
    settings = _settings(cfg, source, block, s.solver, s.steps)
    shape = "x".join(str(d) for d in source.data_shape)
    adaptive = is_adaptive(s.solver)
    steps = "adaptive" if adaptive else f"{s.steps} steps"
    grid = "adaptive" if adaptive else "fixed grid"

    started_ray = ensure_ray()
    try:
        shards = math.ceil(n / shard_size_for(n, block, s.num_actors))
        actors = min(s.num_actors, shards)  # what generate() will use
        num_cpus, threads = actor_resources(actors, s.use_gpu)
        device = pick_device(s.use_gpu)  # the actors' device and kernel flags
        net = source.factory().to(device).eval().requires_grad_(False)  # (a): as loaded
        sampler_net = prepare_model(source.factory(), device)  # (b): as (c)'s actors run it
        # (a) and (b) time whole blocks: their rates need no more than a few of them.
        # Half of them before (c) and half after, pooled: a drift in the machine's speed
        # during the run then weighs on both sides alike.
        blocks_ab = max(1, math.ceil(min(n, speed_samples or n) / block))
        halves = [((blocks_ab + 1) // 2) * block, (blocks_ab // 2) * block]
        n_ab = blocks_ab * block
        keep_freed_memory()  # as (c)'s actors do; (a) gets it too
        with torch_threads(threads):
            plain, sampler = in_process_speed(net, sampler_net, settings, halves[0], device)
        with tempfile.TemporaryDirectory(prefix="fmpipe-bench-sample-") as tmp:
            wall, result, actors = ray_job_speed(cfg, source, block, Path(tmp))
        job_rate, shards = result.samples_per_sec, result.shards
        # each actor's samples/s inside its shards (integrating, encoding, writing)
        in_shards = n / result.shard_seconds if result.shard_seconds > 0 else 0.0
        b_halves = [sampler.per_sec(halves[0])]
        if halves[1]:
            with torch_threads(threads):
                plain_2, sampler_2 = in_process_speed(net, sampler_net, settings, halves[1], device)
            plain, sampler = plain + plain_2, sampler + sampler_2
            b_halves.append(sampler_2.per_sec(halves[1]))
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    figures = SampleFigures(n, actors, threads, plain, sampler, wall, job_rate, n_ab=n_ab)
    log(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"{device.type}"
    )
    log(
        f"model: {source.label} ({source.checkpoint or source.uri}), samples {shape}, "
        f"{source.num_classes or 'no'} classes; {s.solver} {steps}, N={n:,}, block {block}, "
        f"seed {s.seed}"
    )
    log(
        f"(a), (b): this process, {n_ab:,} samples each, {threads} torch threads = what each "
        f"of (c)'s {actors} actor(s) gets ({num_cpus:g} Ray CPU each); (c): {n:,} samples, "
        f"{shards} shards written; all three keep freed heap memory (pipeline.rayenv)"
    )
    log(
        f"(a) and (b) ran half before and half after (c); (b)'s samples/s in the halves: "
        f"{', '.join(f'{rate:,.1f}' for rate in b_halves)}"
    )
    log("")
    log(f"{'':<54} {'samples/s':>10} {'seconds':>8} {'NFE/sample':>11}")
    rows = (
        (f"(a) torchdiffeq.odeint loop ({TORCHDIFFEQ_METHODS[s.solver]}, {grid})", plain),
        ("(b) fmpipe sampler, integrate_range, one process", sampler),
    )
    for name, row in rows:
        log(
            f"{name:<54} {row.per_sec(n_ab):>10,.1f} {row.seconds:>8.2f} "
            f"{row.nfe_per_sample:>11.1f}"
        )
    log(
        f"{f'(c) fmpipe sample on Ray, {actors} actor(s), shards written':<54} "
        f"{figures.c:>10,.1f} {wall:>8.2f} {'':>11}"
    )
    log(f"ratio b/a: {figures.b_over_a:.3f} (goal >= {GOAL_B_OVER_A})")
    log(
        f"ratio c/(b*A): {figures.c_over_ba:.3f} (goal >= {GOAL_C_OVER_BA}), A={actors}; "
        f"(c) is generate() end to end (actor start-up, PNG encoding, shard, manifest and "
        f"grid writes included); its Ray job alone: {job_rate:,.1f} samples/s, "
        f"c/(b*A) {job_rate / (figures.b * actors):.3f}; inside its shards, per actor: "
        f"{in_shards:,.1f} samples/s, {in_shards / figures.b:.3f} of (b)"
    )

    log("")
    _quality_vs_nfe(
        cfg, model_uri, source, sampler_net, figures, data_uri=data_uri,
        quality_samples=quality_samples, block=block, device=device, log=log,
    )  # fmt: skip
    return figures


def _quality_vs_nfe(
    cfg: Config, model_uri: str, source: ModelSource, sampler_net: nn.Module,
    figures: SampleFigures, *, data_uri: str | None, quality_samples: int | None, block: int,
    device: torch.device, log: Log,
) -> None:  # fmt: skip
    """The quality table: sliced W2 of each solver setting against real training images,
    with the real-vs-real floor; skipped (with the reason) when no training data is found."""
    if quality_samples == 0:
        log("quality vs NFE: skipped (--quality-samples 0)")
        return
    data = data_uri or ""
    try:
        data = data or training_data_uri(cfg, model_uri)
        if not data:
            raise ValueError("the checkpoint's config has no data.uri; pass --data URI")
        real = real_images(cfg, data, tuple(source.data_shape))
        if len(real) < 4:
            raise ValueError(f"{data} has {len(real)} training images; the floor needs 4 or more")
    except Exception as exc:  # the quality table is optional: say why it is missing
        reason = " ".join(str(exc).split())
        log(f"quality vs NFE: skipped ({type(exc).__name__}: {reason})")
        return
    with torch_threads(os.cpu_count() or 1):
        q_n, floor, quality = quality_table(
            sampler_net,
            cfg,
            source,
            real,
            quality_samples or figures.num_samples,
            block,
            device,
            cfg.sample.seed,
        )
    figures.quality_n, figures.floor, figures.quality = q_n, floor, quality
    log(
        f"quality vs NFE: sliced Wasserstein-2 (512 directions) in pixel space [-1, 1], "
        f"n={q_n:,} samples of fmpipe's sampler (uint8, as written) vs n real images of "
        f"{data} (train split, {len(real):,} images); floor = the same distance between two "
        f"disjoint real subsets of n; dopri5 atol={cfg.sample.atol:g} rtol={cfg.sample.rtol:g}"
    )
    log(f"{'setting':<18} {'NFE':>6} {'SW2':>9} {'x floor':>8} {'seconds':>8}")
    log(f"{'real vs real':<18} {'-':>6} {floor:>9.4f} {1.0:>8.2f} {'-':>8}  (floor)")
    for row in quality:
        log(
            f"{row.name:<18} {row.nfe:>6.1f} {row.sw2:>9.4f} {row.sw2 / floor:>8.2f} "
            f"{row.seconds:>8.2f}"
        )
