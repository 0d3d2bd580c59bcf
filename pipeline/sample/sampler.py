"""The per-actor work: integrate the flow for an index range and write it as one shard.

:func:`integrate_block` is the only place a sample's numbers are made (see
:mod:`pipeline.sample.determinism` for why it always integrates a whole compute block).
:class:`SamplerActor` is the callable class Ray Data runs on an actor pool: it builds the
network once, then for each input row ``{"shard", "start", "stop"}`` integrates the blocks
covering that range, converts to uint8 PNGs (with ``sample.pairs`` also keeps each float32
``x_1`` as ``.x1.npy``), packs a tar and writes it atomically to
``<out>/shard-NNNNNN.tar``; it returns ``shard, num_samples, sha256, size, nfe, seconds``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.flow.solvers import effective_steps, effective_tolerances, solve_ode
from pipeline.models import guided_velocity, to_device_layout
from pipeline.rayenv import keep_freed_memory
from pipeline.sample.determinism import block_ranges, sample_labels, sample_noise
from pipeline.sample.shards import encode_sample_png, npy_bytes, sample_members, tar_bytes

__all__ = [
    "SamplerActor",
    "SamplerSettings",
    "integrate_block",
    "integrate_range",
    "pick_device",
    "prepare_model",
    "render_shard",
]

RESULT_COLUMNS = ("shard", "num_samples", "sha256", "size", "nfe", "blocks", "seconds")


@dataclass
class SamplerSettings:
    """Everything an actor needs besides the network (plain data: it is pickled to actors)."""

    seed: int
    solver: str
    steps: int
    atol: float
    rtol: float
    guidance_scale: float
    label: int | None
    num_classes: int
    data_shape: tuple[int, ...]
    block_size: int
    chunk_size: int = 256  # samples held and encoded at once (sample.batch_size)
    use_gpu: bool = False
    precision: str = "fp32"  # fp32 | bf16 (autocast around the network; the state stays fp32)
    torch_threads: int = 0  # 0: leave torch's default
    out_uri: str = ""
    storage: dict[str, Any] = field(default_factory=dict)  # StorageConfig fields
    meta: dict[str, Any] = field(default_factory=dict)  # model_uri, model_version, ... per sample
    class_names: tuple[str, ...] = ()  # label id -> name, as the model was trained
    pairs: bool = False  # also write each sample's float32 x_1 (<key>.x1.npy): sample.pairs

    @property
    def fixed_steps(self) -> int | None:
        """``steps`` as the solver takes them: None for an adaptive solver (dopri5)."""
        return effective_steps(self.solver, self.steps)

    def sample_meta(self, index: int, label: int | None) -> dict[str, Any]:
        meta = {
            "index": index,
            "seed": self.seed,
            "solver": self.solver,
            "steps": self.fixed_steps,
            "label": label,
            "guidance_scale": self.guidance_scale,
            "block_size": self.block_size,
            **self.meta,
        }
        tolerances = effective_tolerances(self.solver, self.atol, self.rtol)
        if tolerances is not None:  # only a solver that uses them records them
            meta.update(atol=tolerances[0], rtol=tolerances[1])
        if self.precision != "fp32":
            meta["precision"] = self.precision
        if self.pairs:
            meta["pairs"] = True
        if label is not None and 0 <= label < len(self.class_names):
            meta["class_name"] = self.class_names[label]  # what the dataset called it
        return meta


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The network as every sampler runs it: on ``device`` in its fastest layout there
    (:func:`pipeline.models.to_device_layout`: channels-last on the CPU), in eval mode,
    without gradients. Actors and in-process samplers all prepare it this way, so sample i
    stays bit-identical across batch sizes, actors and restarts.
    """
    return to_device_layout(model, device).eval().requires_grad_(False)


def integrate_block(
    model: nn.Module,
    block_start: int,
    settings: SamplerSettings,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, int]:
    """``x_1`` of samples ``[block_start, block_start + block_size)``, float32 on the CPU.

    Returns ``(x_1 (block_size, *data_shape), nfe)``. ``block_start`` must be a multiple of
    ``block_size``: the network only ever sees whole blocks.
    """
    size = settings.block_size
    if block_start % size:
        raise ValueError(f"block_start {block_start} is not a multiple of block_size {size}")
    indices = range(block_start, block_start + size)
    x_0 = sample_noise(settings.seed, indices, settings.data_shape).to(device)
    labels = sample_labels(indices, settings.num_classes, settings.label)
    if labels is not None:
        labels = labels.to(device)
    w = float(settings.guidance_scale)
    device_type = torch.device(device).type
    if settings.precision == "bf16":
        arithmetic = torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    else:
        arithmetic = contextlib.nullcontext()

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with arithmetic:
            v = guided_velocity(model, x, t, labels, w)
        return v.float()

    with torch.inference_mode():
        solution = solve_ode(
            velocity,
            x_0,
            method=settings.solver,
            steps=settings.fixed_steps,
            atol=settings.atol,
            rtol=settings.rtol,
        )
    return solution.x_1.float().to("cpu"), solution.nfe


def integrate_range(
    model: nn.Module, start: int, stop: int, settings: SamplerSettings, device: Any = "cpu"
) -> tuple[torch.Tensor, list[int]]:
    """``x_1`` of samples ``[start, stop)`` (float32, CPU) and the NFE of each block used."""
    outputs, nfes = [], []
    for a, b in block_ranges(start, stop, settings.block_size):
        x_1, nfe = integrate_block(model, a, settings, device)
        outputs.append(x_1[max(start, a) - a : min(stop, b) - a])
        nfes.append(nfe)
    return torch.cat(outputs), nfes


def to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` floats in [-1, 1] -> uint8 ``(N, H, W, C)`` (see pipeline.viz.to_uint8)."""
    from pipeline.viz import to_uint8

    return to_uint8(x)


def render_shard(
    model: nn.Module, start: int, stop: int, settings: SamplerSettings, device: Any = "cpu"
) -> tuple[bytes, list[int]]:
    """The tar bytes of samples ``[start, stop)`` and the NFE of every block integrated.

    Works through the range ``chunk_size`` samples at a time (rounded to whole blocks), so
    memory stays bounded for any shard size; the bytes do not depend on ``chunk_size``.
    """
    members: list[tuple[str, bytes]] = []
    nfes: list[int] = []
    chunk = max(1, math.ceil(settings.chunk_size / settings.block_size)) * settings.block_size
    a = start
    while a < stop:
        b = min(stop, (a // chunk + 1) * chunk)
        x_1, block_nfes = integrate_range(model, a, b, settings, device)
        nfes += block_nfes
        images = to_uint8_hwc(x_1)
        labels = sample_labels(range(a, b), settings.num_classes, settings.label)
        for row, index in enumerate(range(a, b)):
            label = None if labels is None else int(labels[row])
            png = encode_sample_png(images[row])
            x_1_bytes = npy_bytes(x_1[row].numpy()) if settings.pairs else None
            meta = settings.sample_meta(index, label)
            members += sample_members(index, png, meta, label, x_1=x_1_bytes)
        a = b
    return tar_bytes(members), nfes


def pick_device(use_gpu: bool) -> torch.device:
    """The device a sampler runs on, with the kernel settings that keep samples reproducible.

    CPU unless ``use_gpu``; on CUDA it also turns cuDNN autotuning and TF32 off and asks for
    deterministic kernels, so a restarted actor computes the same bits. Benchmarks call it
    to time exactly what the actors run.

    Raises:
        RuntimeError: ``use_gpu`` but this process sees no CUDA device.
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "sample.use_gpu is true but this Ray actor sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r})"
        )
    # Same shape -> same kernels: no autotuning that could pick another algorithm on a restart.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


class SamplerActor:
    """Ray Data callable class: one network per actor, one shard per input row."""

    def __init__(self, factory: Callable[[], nn.Module], settings: SamplerSettings) -> None:
        from pipeline.config import StorageConfig
        from pipeline.storage import resolve

        # torch's thread count is set in __call__, on the thread Ray Data samples on. Building
        # the network here with several threads would leave a second multi-threaded OpenMP
        # team in the process (one per thread that runs parallel work); with more OpenMP
        # threads than cores libgomp throttles its spin-waits, and sampling ran ~1.2x slower.
        keep_freed_memory()  # each block reuses the last one's pages (pipeline.rayenv)
        self.settings = settings
        self.device = pick_device(settings.use_gpu)
        self.model = prepare_model(factory(), self.device)
        self.out = resolve(settings.out_uri, StorageConfig(**settings.storage))

    def write_shard(self, shard: int, start: int, stop: int) -> dict[str, Any]:
        from pipeline.data.manifest import shard_name

        began = time.perf_counter()
        data, nfes = render_shard(self.model, start, stop, self.settings, self.device)
        self.out.child(shard_name(shard)).write_bytes(data)  # atomic: whole or absent
        return {
            "shard": shard,
            "num_samples": stop - start,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "nfe": int(sum(nfes)),
            "blocks": len(nfes),
            "seconds": time.perf_counter() - began,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Here, on the thread that does the work (not the constructor's: see __init__).
        if self.settings.torch_threads > 0:
            torch.set_num_threads(self.settings.torch_threads)
        rows = [
            self.write_shard(int(j), int(a), int(b))
            for j, a, b in zip(batch["shard"], batch["start"], batch["stop"], strict=True)
        ]
        return {key: np.asarray([row[key] for row in rows]) for key in RESULT_COLUMNS}
