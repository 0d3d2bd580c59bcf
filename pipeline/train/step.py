"""One optimizer step of conditional flow matching, over ``grad_accum`` micro-batches.

Per step::

    for each of grad_accum micro-batches (batch_size / (workers * grad_accum) rows each):
        x_t = t * x_1 + (1 - t) * x_0;  loss = || v(x_t, t, y) - (x_1 - x_0) ||^2
          (train.objective=distill: t on the k-step grid, loss = d(x_t + (1 - t) v, x_1))
        backward (DDP all-reduces the gradients on the last micro-batch only)
    zero non-finite gradient elements; clip the global norm; AdamW at lr * lr_factor; EMA

Global batch layout (what makes 1 and N workers the same run): the step's global batch is
``[micro j][rank k][row]``; rank ``k``'s ``j``-th micro-batch is global rows
``j * batch_size / grad_accum + k * micro + [0, micro)``. Label dropout (to the null class,
for classifier-free guidance) is drawn per global row from ``(seed, images_seen)``, so it
does not depend on the worker count either.

The run ends at exactly ``train.total_images``: the last step may be partial, and then only
the first ``total_images - images_seen`` rows of its global batch count (the others are
masked to 0); its lr, EMA decay and images seen use that count.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.config import Config
from pipeline.data.coupling import sample_seed
from pipeline.optim import lr_factor
from pipeline.train.dist import WorkerGroup
from pipeline.train.objective import Objective, velocity_on_rows
from pipeline.train.setup import TrainingParts, autocast
from pipeline.train.validate import model_labels

__all__ = ["CFMStep", "StepOutcome"]


@dataclass
class StepOutcome:
    """What one optimizer step did. Sums stay on the device (read them only when logging:
    reading every step would make the host wait for the GPU once per step)."""

    images: int  # rows of the global batch that counted (batch_size, or less on the last)
    loss_sum: Tensor  # sum of per-sample losses over this rank's counted rows
    rows: Tensor  # this rank's counted rows
    grad_norm: Tensor  # global gradient norm before clipping
    lr: float
    seconds: float  # wall time of the step
    wait_seconds: float  # of which waiting for the next micro-batch


class CFMStep:
    """Callable optimizer step over a worker's micro-batch iterator (see the module doc)."""

    def __init__(self, cfg: Config, parts: TrainingParts, group: WorkerGroup, micro: int):
        self.cfg, self.parts, self.group, self.micro = cfg, parts, group, micro
        self.params = [p for p in parts.net.parameters() if p.requires_grad]
        self.chunk = cfg.data.batch_size // cfg.train.grad_accum  # global rows per micro-batch
        self.objective = Objective.from_config(cfg.train)  # CFM, or a student's landing loss

    def _label_dropout(self, images_seen: int) -> Tensor | None:
        """Per global row: True where the label becomes the null class this step."""
        rate = self.cfg.train.label_dropout
        if self.parts.num_classes <= 0 or rate <= 0:
            return None
        seed = sample_seed(self.cfg.seed, images_seen, "", stream="label-dropout")
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(self.cfg.data.batch_size, generator=gen) < rate

    def _next(self, batches: Iterator[dict[str, Tensor]], before: int) -> dict[str, Tensor]:
        try:
            return next(batches)
        except StopIteration:
            raise RuntimeError(
                f"rank {self.group.rank}: the data stream ended at {before} of "
                f"{self.cfg.train.total_images} images"
            ) from None

    def __call__(self, batches: Iterator[dict[str, Tensor]]) -> tuple[StepOutcome, int | None]:
        """Take one step from ``batches``; returns the outcome and the data epoch seen (if any).

        Advances ``parts.state`` (images seen, step) and the EMA.
        """
        cfg, parts, device = self.cfg, self.parts, self.group.device
        state, world, micro = parts.state, self.group.world_size, self.micro
        accum = cfg.train.grad_accum
        t_start = time.perf_counter()
        wait = 0.0
        before = state.images_seen
        n_step = min(cfg.data.batch_size, cfg.train.total_images - before)  # partial: last only
        lr_now = cfg.train.lr * lr_factor(
            before, cfg.train.total_images, cfg.train.warmup_images, cfg.train.lr_schedule
        )
        for group in parts.optimizer.param_groups:
            group["lr"] = lr_now
        drop = self._label_dropout(before)
        parts.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        step_rows = torch.zeros((), device=device)
        epoch: int | None = None
        for j in range(accum):
            t_wait = time.perf_counter()
            batch = self._next(batches, before)
            wait += time.perf_counter() - t_wait
            x_1 = batch["x_1"].to(device, non_blocking=True)
            x_0 = batch["x_0"].to(device, non_blocking=True).float()
            # the row's t (a student's: rounded down to its k-step grid)
            t = self.objective.times(batch["t"].to(device, non_blocking=True).float())
            if len(x_1) != micro:
                raise RuntimeError(
                    f"rank {self.group.rank}: got a batch of {len(x_1)} rows, expected {micro}"
                )
            if "epoch" in batch:
                epoch = int(batch["epoch"].min())
            rows = j * self.chunk + self.group.rank * micro + torch.arange(micro)
            used = (rows < n_step).to(device=device, dtype=torch.float32)
            label = None
            if parts.num_classes > 0:
                label = model_labels(batch["label"].long(), parts.num_classes)
                if drop is not None:
                    null = torch.full_like(label, parts.num_classes)
                    label = torch.where(drop[rows], null, label)
                label = label.to(device, non_blocking=True)
            last = j == accum - 1
            sync = parts.ddp.no_sync() if parts.ddp is not None and not last else None
            with sync or contextlib.nullcontext():
                with autocast(cfg.train.precision, device):
                    # a student's own states (rollout, unrolled) come from the bare network:
                    # one DDP forward per backward (tests/test_distill_ddp.py)
                    x_t = self.objective.states(x_0, x_1, t, velocity_on_rows(parts.net, label))
                    velocity = parts.model(x_t, t, label)
                per_sample = self.objective.per_sample(velocity.float(), x_0, x_1, x_t, t)
                # DDP averages gradients over ranks: scale by world / n_step so the step's
                # gradient is the mean over the n_step counted rows of the global batch.
                loss = (per_sample * used).sum() * (world / n_step)
                loss.backward()
            step_loss += (per_sample.detach() * used).sum()
            step_rows += used.sum()
        for p in self.params:  # as in EDM2: a rare inf/nan gradient element must not poison
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm).detach()
        parts.optimizer.step()
        state.images_seen = before + n_step
        state.step += 1
        parts.ema.update(parts.net, state.images_seen, n_step)
        outcome = StepOutcome(
            images=n_step, loss_sum=step_loss, rows=step_rows, grad_norm=grad_norm, lr=lr_now,
            seconds=time.perf_counter() - t_start, wait_seconds=wait,
        )  # fmt: skip
        return outcome, epoch
