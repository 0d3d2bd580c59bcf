"""The baseline training step of ``fmpipe bench train`` and ``fmpipe bench gpu``.

A plain single-process PyTorch step, no Ray, no DDP: draw ``x_0 ~ N(0, I)`` and
``t ~ U[0, 1)``, form ``x_t = t x_1 + (1 - t) x_0``, take the CFM loss
``|v(x_t, t, y) - (x_1 - x_0)|^2`` (labels dropped to the null class at
``train.label_dropout``), backward, clip the gradient norm, AdamW step (fused on CUDA, as
fmpipe's loop uses it; on the CPU torch's default per-tensor loop, where fmpipe's loop
takes the fused kernel: :func:`pipeline.optim.adamw`), EMA update
(``torch._foreach_lerp_``). It imports neither Ray nor the data stack, so the GPU
benchmark runs where only PyTorch is installed.

Also the process-wide settings the benchmarks change for a block and put back: torch's
thread count (:func:`torch_threads`) and environment variables (:func:`scoped_environ`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.models import build_model
from pipeline.train.setup import autocast

__all__ = [
    "LoopTiming",
    "PlainTrainer",
    "batches",
    "sync",
    "timed_steps",
    "torch_threads",
]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (at least 1) for the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainTrainer:
    """The plain PyTorch training step (module doc) on one device.

    ``step(x_1 (B, C, H, W), label (B,) | None, x_0=None)`` trains on one batch.
    """

    def __init__(self, cfg: Config, data_shape: tuple[int, ...], device: torch.device) -> None:
        t = cfg.train
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.seed)  # the same initial weights as fmpipe's worker
        self.net = build_model(cfg.model, data_shape).to(device).train()
        self.model: nn.Module = torch.compile(self.net) if t.compile else self.net
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.ema_params = list(self.ema.parameters())
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=t.lr,
            betas=tuple(t.adam_betas),
            weight_decay=t.weight_decay,
            fused=device.type == "cuda" or None,
        )
        self.num_classes = int(getattr(self.net, "num_classes", 0) or 0)
        self.ema_beta = 0.5 ** (cfg.data.batch_size / t.ema_halflife_images)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    def step(self, x_1: Tensor, label: Tensor | None, x_0: Tensor | None = None) -> None:
        """One step on ``x_1``; ``x_0`` (same shape) fixes each row's noise (reflow's
        coupling), None draws it ~ N(0, I) from the trainer's generator."""
        t_cfg = self.cfg.train
        batch = x_1.shape[0]
        if x_0 is None:
            x_0 = torch.randn(x_1.shape, generator=self.generator, device=self.device)
        t = torch.rand(batch, generator=self.generator, device=self.device)
        if self.num_classes > 0 and label is not None:
            label = label.clamp(min=0)  # unlabelled rows (-1) would be class 0; digits have none
            if t_cfg.label_dropout > 0:
                drop = torch.rand(batch, generator=self.generator, device=self.device)
                label = torch.where(drop < t_cfg.label_dropout, self.num_classes, label)
        else:
            label = None
        t_b = t.view(-1, *([1] * (x_1.ndim - 1)))
        x_t = t_b * x_1 + (1 - t_b) * x_0
        with autocast(self.cfg.train.precision, self.device):
            velocity = self.model(x_t, t, label)
        loss = (velocity.float() - (x_1 - x_0)).square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t_cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema_beta)


def batches(x_1: Tensor, label: Tensor, batch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless contiguous slices of one seeded permutation (wrapping at the end)."""
    n = len(x_1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x_1, label = x_1[perm].contiguous(), label[perm].contiguous()
    start = 0
    while True:
        stop = start + batch
        if stop <= n:
            yield x_1[start:stop], label[start:stop]
        else:
            wrap = stop - n
            yield torch.cat([x_1[start:], x_1[:wrap]]), torch.cat([label[start:], label[:wrap]])
        start = stop % n


@dataclass
class LoopTiming:
    """Seconds of one run of consecutive steps: ``warmup`` steps, then ``timed`` steps."""

    warmup_seconds: float
    steady_seconds: float
    warmup: int
    timed: int
    batch: int

    @property
    def images(self) -> int:
        return (self.warmup + self.timed) * self.batch

    @property
    def steady_images_per_sec(self) -> float:
        return self.timed * self.batch / self.steady_seconds


def timed_steps(
    trainer: PlainTrainer,
    source: Iterator[tuple[Tensor, Tensor]],
    warmup: int,
    timed: int,
) -> LoopTiming:
    """``warmup`` untimed-for-the-figure steps, then ``timed`` steps, both clocked."""
    device = trainer.device
    sync(device)
    began = time.perf_counter()
    for _ in range(warmup):
        trainer.step(*next(source))
    sync(device)
    mark = time.perf_counter()
    for _ in range(timed):
        trainer.step(*next(source))
    sync(device)
    return LoopTiming(
        mark - began, time.perf_counter() - mark, warmup, timed, trainer.cfg.data.batch_size
    )
