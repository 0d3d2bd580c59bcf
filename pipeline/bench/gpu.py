"""``fmpipe bench gpu``: training MFU and sampling throughput of the U-Net on one GPU.

One run, one network config (``jobs/configs/gpu.yaml`` by default: a CIFAR-class U-Net,
3 x 32 x 32, base 128, ``channel_mult [1, 2, 2, 2]``, 2 res blocks, attention at 16x16),
synthetic data (speed does not depend on the pixels):

ceiling   an 8192^3 bf16 matrix product on random data (median of 10 after 3 warm-ups):
          the rate the chip reaches on the easiest matrix work, next to its datasheet peak.
train     the plain bf16 training step (:class:`pipeline.bench.plain.PlainTrainer`: the
          CFM loss, backward, clipping, fused AdamW, EMA) at 32x32 and 64x64 (attention at
          the same U-Net levels), eager and ``torch.compile``; images/s and the model FLOP
          utilisation ``MFU = 3 x forward FLOPs / step time / peak``, forward FLOPs counted
          by ``torch.utils.flop_counter`` (matmuls, convolutions, attention; 2 per
          multiply-add; element-wise work not counted, as is usual).
sample    fmpipe's sampler (:func:`pipeline.sample.sampler.integrate_block`, Euler,
          ``--steps``, compute blocks of ``--block``) exactly as a ``fmpipe sample`` actor
          runs it (cuDNN deterministic, no TF32), in fp32 and in bf16 autocast
          (``sample.precision``), and bf16 with ``torch.compile``; samples/s and MFU
          (forward FLOPs x NFE).

The runs go most important first, and a run that would start after ``--budget`` seconds
is skipped and says so, so the table always comes back from a fixed-length lease. No Ray,
MLflow or data stack is imported: the benchmark runs where only PyTorch (and pydantic,
for the config) is installed.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.bench.plain import PlainTrainer, sync
from pipeline.config import Config
from pipeline.models import build_model, count_parameters

__all__ = [
    "PEAK_BF16_TFLOPS",
    "GpuFigures",
    "SampleRow",
    "forward_flops",
    "gpu_section",
    "gpu_throughput",
    "matmul_tflops",
    "peak_bf16_flops",
    "run_gpu_benchmark",
    "sample_throughput",
]

GPU_RESOLUTIONS = (32, 64)
WARMUP_STEPS = 10  # training steps before the clock starts (compilation happens here)
TIMED_STEPS = 30
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
# Matched in order against torch.cuda.get_device_name(): the first key contained wins.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}

Log = Callable[[str], None]


# --------------------------------------------------------------------------- FLOPs, peaks
def forward_flops(model: nn.Module, x: Tensor, t: Tensor, label: Tensor | None) -> int:
    """FLOPs of one forward pass, as ``torch.utils.flop_counter.FlopCounterMode`` counts them.

    Matrix multiplies, convolutions and attention (2 FLOPs per multiply-add); element-wise
    work (norms, activations) is not counted, as is usual for MFU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t, label)
    return int(counter.get_total_flops())


def peak_bf16_flops(device_name: str, override_tflops: float | None = None) -> tuple[float, str]:
    """``(peak FLOP/s, how it was chosen)`` for the device, or ``(nan, reason)`` if unknown."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12, f"{key} dense bf16 {tflops:g} TFLOP/s (datasheet)"
    return math.nan, f"unknown for '{device_name}' (pass --peak-tflops)"


def matmul_tflops(device: torch.device | str = "cuda", n: int = 8192, reps: int = 10) -> float:
    """Median TFLOP/s of an ``n^3`` bf16 matrix product on random data (after 3 warm-ups)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), generator=gen, device=device, dtype=torch.bfloat16)
    b = torch.randn((n, n), generator=gen, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(reps):
        sync(device)
        began = time.perf_counter()
        a @ b
        sync(device)
        seconds.append(time.perf_counter() - began)
    return 2 * n**3 / sorted(seconds)[len(seconds) // 2] / 1e12


def scaled_model(cfg: Config, resolution: int) -> Config:
    """``cfg`` at another resolution, attention kept at the same U-Net levels."""
    out = cfg.model_copy(deep=True)
    factor = resolution / cfg.data.resolution
    out.model.attention_resolutions = [
        round(size * factor) for size in cfg.model.attention_resolutions
    ]
    out.data.resolution = resolution
    return out


def _inputs(
    cfg: Config, batch: int, device: torch.device, num_classes: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    r, c = cfg.data.resolution, cfg.data.channels
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand((batch, c, r, r), generator=gen, device=device) * 2 - 1
    t = torch.rand(batch, generator=gen, device=device)
    label = torch.arange(batch, device=device) % num_classes if num_classes else None
    return x, t, label


# --------------------------------------------------------------------------- training
@dataclass
class GpuFigures:
    """One training row: the plain bf16 step at one resolution, eager or compiled."""

    resolution: int
    mode: str  # eager | compile
    params: int
    batch: int
    images_per_sec: float
    step_ms: float
    forward_gflops_per_image: float
    achieved_tflops: float
    mfu: float  # of the datasheet peak; nan when unknown


def gpu_throughput(
    cfg: Config,
    resolution: int,
    batch: int,
    *,
    peak_flops: float,
    device: torch.device | str = "cuda",
    warmup: int = WARMUP_STEPS,
    steps: int = TIMED_STEPS,
    compile: bool = False,
    channels_last: bool = False,
) -> GpuFigures:
    """Images/s and MFU of the plain bf16 training step at ``resolution`` on ``device``."""
    device = torch.device(device)
    scaled = scaled_model(cfg, resolution)
    scaled.train.precision = "bf16"
    scaled.train.compile = compile
    scaled.data.batch_size = batch
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
    trainer = PlainTrainer(scaled, (cfg.data.channels, resolution, resolution), device)
    x_1, t, label = _inputs(scaled, batch, device, trainer.num_classes)
    if channels_last:  # NHWC activations: cuDNN's tensor-core kernels skip the transposes
        trainer.net.to(memory_format=torch.channels_last)
        x_1 = x_1.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        flops = forward_flops(trainer.net, x_1, t, label)
    for _ in range(warmup):
        trainer.step(x_1, label)
    sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        trainer.step(x_1, label)
    sync(device)
    step_seconds = (time.perf_counter() - began) / steps
    achieved = 3 * flops / step_seconds
    return GpuFigures(
        resolution=resolution,
        mode=("compile" if compile else "eager") + ("+NHWC" if channels_last else ""),
        params=count_parameters(trainer.net),
        batch=batch,
        images_per_sec=batch / step_seconds,
        step_ms=1000 * step_seconds,
        forward_gflops_per_image=flops / batch / 1e9,
        achieved_tflops=achieved / 1e12,
        mfu=achieved / peak_flops if peak_flops > 0 else math.nan,
    )


def _percent(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


TRAIN_HEADER = (
    f"{'res':>4} {'mode':>13} {'params':>11} {'batch':>6} {'images/s':>10} {'step ms':>8} "
    f"{'fwd GFLOP/img':>14} {'TFLOP/s':>8} {'MFU':>7}"
)


def train_line(row: GpuFigures) -> str:
    return (
        f"{row.resolution:>4} {row.mode:>13} {row.params:>11,} {row.batch:>6} "
        f"{row.images_per_sec:>10,.0f} {row.step_ms:>8.1f} "
        f"{row.forward_gflops_per_image:>14.3f} {row.achieved_tflops:>8.1f} "
        f"{_percent(row.mfu):>7}"
    )


def gpu_section(cfg: Config, batch: int, peak_tflops: float | None, log: Log) -> list[GpuFigures]:
    """``fmpipe bench train``'s CUDA rows: its own network, eager, at 32x32 and 64x64."""
    if not torch.cuda.is_available():
        log("GPU: skipped (no CUDA device here); with one, bf16 images/s and MFU at 32x32, 64x64")
        return []
    name = torch.cuda.get_device_name()
    peak, how = peak_bf16_flops(name, peak_tflops)
    log("")
    log(f"GPU {name}: plain bf16 training step (a), synthetic images, batch {batch}")
    log(f"MFU = 3 x forward FLOPs (torch.utils.flop_counter) / step time / peak; peak = {how}")
    log("(fmpipe bench gpu measures a GPU-sized U-Net, compiled too, and sampling)")
    log(TRAIN_HEADER)
    rows = []
    for res in GPU_RESOLUTIONS:
        rows.append(gpu_throughput(cfg, res, batch, peak_flops=peak, device="cuda"))
        log(train_line(rows[-1]))
    return rows


# --------------------------------------------------------------------------- sampling
@dataclass
class SampleRow:
    """One sampling row: fmpipe's sampler at one resolution, precision and mode."""

    resolution: int
    precision: str  # fp32 | bf16
    mode: str  # eager | compile
    block: int
    steps: int
    samples_per_sec: float
    seconds_per_block: float
    achieved_tflops: float
    mfu: float


def sample_throughput(
    cfg: Config,
    resolution: int,
    *,
    precision: str,
    compile: bool,
    block: int,
    steps: int,
    blocks: int,
    peak_flops: float,
    device: torch.device | str = "cuda",
) -> SampleRow:
    """Samples/s of :func:`integrate_block` (Euler, ``steps``) after one untimed block."""
    from pipeline.sample.sampler import SamplerSettings, integrate_block, pick_device

    device = torch.device(device)
    if device.type == "cuda":
        device = pick_device(True)  # the actor's settings: deterministic cuDNN, no TF32
    scaled = scaled_model(cfg, resolution)
    shape = (cfg.data.channels, resolution, resolution)
    torch.manual_seed(cfg.seed)
    net = build_model(scaled.model, shape).to(device).eval().requires_grad_(False)
    num_classes = int(getattr(net, "num_classes", 0) or 0)
    model: nn.Module = torch.compile(net) if compile else net
    settings = SamplerSettings(
        seed=cfg.seed, solver="euler", steps=steps, atol=1e-5, rtol=1e-5, guidance_scale=1.0,
        label=None, num_classes=num_classes, data_shape=shape, block_size=block,
        use_gpu=device.type == "cuda", precision=precision,
    )  # fmt: skip
    x, t, label = _inputs(scaled, block, device, num_classes)
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            flops = forward_flops(net, x, t, label)
    else:
        flops = forward_flops(net, x, t, label)
    integrate_block(model, 0, settings, device)  # warm-up (and compilation)
    sync(device)
    began = time.perf_counter()
    nfe = 0
    for k in range(1, blocks + 1):
        _, used = integrate_block(model, k * block, settings, device)
        nfe += used
    sync(device)
    seconds = time.perf_counter() - began
    achieved = flops * nfe / seconds
    return SampleRow(
        resolution=resolution,
        precision=precision,
        mode="compile" if compile else "eager",
        block=block,
        steps=steps,
        samples_per_sec=blocks * block / seconds,
        seconds_per_block=seconds / blocks,
        achieved_tflops=achieved / 1e12,
        mfu=achieved / peak_flops if peak_flops > 0 else math.nan,
    )


SAMPLE_HEADER = (
    f"{'res':>4} {'precision':>9} {'mode':>13} {'block':>6} {'steps':>5} {'samples/s':>10} "
    f"{'s/block':>8} {'TFLOP/s':>8} {'MFU':>7}"
)


def sample_line(row: SampleRow) -> str:
    return (
        f"{row.resolution:>4} {row.precision:>9} {row.mode:>13} {row.block:>6} {row.steps:>5} "
        f"{row.samples_per_sec:>10,.1f} {row.seconds_per_block:>8.2f} "
        f"{row.achieved_tflops:>8.1f} {_percent(row.mfu):>7}"
    )


def profile_training(
    cfg: Config, resolution: int, batch: int, device: torch.device, log: Log, top: int = 15
) -> None:
    """Where the eager bf16 training step spends GPU time: the ``top`` kernels of 5 steps."""
    from torch.profiler import ProfilerActivity, profile

    scaled = scaled_model(cfg, resolution)
    scaled.train.precision = "bf16"
    scaled.data.batch_size = batch
    trainer = PlainTrainer(scaled, (cfg.data.channels, resolution, resolution), device)
    x_1, _, label = _inputs(scaled, batch, device, trainer.num_classes)
    for _ in range(3):
        trainer.step(x_1, label)
    sync(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(5):
            trainer.step(x_1, label)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(f"profile: eager bf16 training step at {resolution}x{resolution}, batch {batch}, 5 steps")
    log(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))


RUN_KINDS = ("train", "nhwc", "sample", "train-compile", "sample-compile")


# --------------------------------------------------------------------------- the benchmark
@dataclass
class GpuBenchmark:
    device: str
    peak: str
    matmul_tflops: float
    train: list[GpuFigures]
    sample: list[SampleRow]
    skipped: list[str]


def run_gpu_benchmark(
    cfg: Config,
    *,
    resolutions: tuple[int, ...] = GPU_RESOLUTIONS,
    train_batch: int = 256,
    sample_block: int = 500,
    sample_steps: int = 32,
    sample_blocks: int = 2,
    compile: bool = True,
    peak_tflops: float | None = None,
    budget_seconds: float = 420.0,
    device: str = "cuda",
    json_out: str | None = None,
    runs: tuple[str, ...] = RUN_KINDS,
    profile: bool = False,
    log: Log = print,
) -> GpuBenchmark:
    """Ceiling, training rows, sampling rows (module doc); most important first."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("fmpipe bench gpu: no CUDA device is visible (--device cpu to try it)")
    began = time.perf_counter()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    peak, how = peak_bf16_flops(name, peak_tflops)
    if dev.type == "cpu" and math.isnan(peak):
        peak, how = 1e12, "1 TFLOP/s (placeholder on CPU: the MFU column means nothing here)"
    log(f"device: {name}; torch {torch.__version__}; peak = {how}")
    ceiling = matmul_tflops(dev, n=8192 if dev.type == "cuda" else 512)
    log(f"ceiling: bf16 matrix product on random data {ceiling:,.1f} TFLOP/s "
        f"({_percent(ceiling * 1e12 / peak)} of the peak)")  # fmt: skip
    m = cfg.model
    log(
        f"network: {m.kind}, base {m.base_channels}, mult {m.channel_mult}, "
        f"{m.num_res_blocks} res blocks, attention at {m.attention_resolutions} of "
        f"{cfg.data.resolution}, {m.num_classes} classes, {cfg.data.channels} channels"
    )
    result = GpuBenchmark(name, how, ceiling, [], [], [])
    unknown = sorted(set(runs) - set(RUN_KINDS))
    if unknown:
        raise ValueError(f"--runs: unknown {unknown}; choose from {', '.join(RUN_KINDS)}")
    if profile:
        profile_training(cfg, resolutions[0], train_batch, dev, log)

    def save() -> None:
        if json_out:
            Path(json_out).write_text(json.dumps(asdict(result), indent=2))

    # Most important first; each entry runs only while the budget lasts.
    plan: list[tuple[str, Callable[[], object]]] = []
    for res in resolutions if "train" in runs else ():
        plan.append((f"train {res} eager", lambda r=res: gpu_throughput(
            cfg, r, train_batch, peak_flops=peak, device=dev)))  # fmt: skip
    for res in resolutions if "nhwc" in runs else ():
        plan.append((f"train {res} eager NHWC", lambda r=res: gpu_throughput(
            cfg, r, train_batch, peak_flops=peak, device=dev, channels_last=True)))  # fmt: skip
    for res in resolutions if "sample" in runs else ():
        for precision in ("bf16", "fp32"):
            plan.append((f"sample {res} {precision} eager", lambda r=res, p=precision:
                sample_throughput(cfg, r, precision=p, compile=False, block=sample_block,
                                  steps=sample_steps, blocks=sample_blocks, peak_flops=peak,
                                  device=dev)))  # fmt: skip
    if compile:
        for res in resolutions if "train-compile" in runs else ():
            plan.append((f"train {res} compile", lambda r=res: gpu_throughput(
                cfg, r, train_batch, peak_flops=peak, device=dev, compile=True)))  # fmt: skip
        for res in resolutions if "sample-compile" in runs else ():
            plan.append((f"sample {res} bf16 compile", lambda r=res: sample_throughput(
                cfg, r, precision="bf16", compile=True, block=sample_block, steps=sample_steps,
                blocks=sample_blocks, peak_flops=peak, device=dev)))  # fmt: skip

    for label, run in plan:
        elapsed = time.perf_counter() - began
        if elapsed > budget_seconds:
            result.skipped.append(label)
            log(f"skipped: {label} (budget {budget_seconds:.0f} s spent)")
            continue
        t0 = time.perf_counter()
        try:
            row = run()
        except Exception as exc:  # one failing variant must not lose the others' figures
            result.skipped.append(f"{label}: {type(exc).__name__}: {exc}")
            log(f"failed: {label}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if isinstance(row, GpuFigures):
            result.train.append(row)
            log(f"done: {label} in {time.perf_counter() - t0:.0f} s: {train_line(row)}")
        else:
            assert isinstance(row, SampleRow)
            result.sample.append(row)
            log(f"done: {label} in {time.perf_counter() - t0:.0f} s: {sample_line(row)}")
        save()

    log("")
    log(f"training: plain bf16 step, batch {train_batch}, {TIMED_STEPS} steps timed after "
        f"{WARMUP_STEPS}; MFU = 3 x forward FLOPs / step time / peak")  # fmt: skip
    log(TRAIN_HEADER)
    for row in result.train:
        log(train_line(row))
    log("")
    log(f"sampling: fmpipe sampler, Euler {sample_steps} steps (NFE {sample_steps}), blocks of "
        f"{sample_block}, {sample_blocks} blocks timed after 1; MFU = forward FLOPs x NFE / "
        f"time / peak")  # fmt: skip
    log(SAMPLE_HEADER)
    for row in result.sample:
        log(sample_line(row))
    if result.skipped:
        log(f"not measured: {'; '.join(result.skipped)}")
    log(f"wall time {time.perf_counter() - began:.0f} s")
    save()
    return result
