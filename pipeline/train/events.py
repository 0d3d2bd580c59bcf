"""What happens between optimizer steps: metrics, validation, sample grids, checkpoints.

Each event fires on the step whose images-seen count crosses a multiple of its interval
(``train.log_every_steps`` counts steps instead), and every one of them fires on the last
step. MLflow is written from rank 0 only; the MLflow step of every metric is images seen.

- **log**: loss (mean over the window's counted rows, all ranks), lr, gradient norm,
  images/s and the fraction of step time spent waiting for data;
- **val**: ``val_loss`` of the EMA weights on the fixed validation draws;
- **grid**: EMA samples at fixed seeds (one row per class when conditional) as a PNG;
- **eval** (``train.eval_every_images`` > 0): sample quality of the EMA weights,
  ``eval/fd``, ``eval/kid``, ... (:mod:`pipeline.eval.probe`); the last figures are also
  tags ``eval.<network>.<figure>`` of the registered version;
- **checkpoint**: ``ray.train.report`` from every rank (a barrier); rank 0 writes the
  directory (:mod:`pipeline.checkpoint`) and passes it. The final one is also logged as run
  artifacts under ``checkpoint/images_<N>`` and, with ``train.registered_model_name``,
  registered as a model version (tags: manifest hash, images seen, validation loss, run
  name); ``train.alias`` then points at that version.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.checkpoint import bare_module, rng_state, save_checkpoint
from pipeline.config import Config
from pipeline.data.coupling import sample_generator
from pipeline.flow import solve_ode
from pipeline.models import guided_velocity
from pipeline.storage import StorageError
from pipeline.train.dist import WorkerGroup, report
from pipeline.train.objective import Objective
from pipeline.train.setup import TrainingParts
from pipeline.train.spec import RunContext, checkpoint_dir_name
from pipeline.train.step import StepOutcome
from pipeline.train.validate import validation_loss

__all__ = ["CHECKPOINT_ARTIFACTS", "GRID_COLUMNS", "Events", "Progress", "sample_grid"]

CHECKPOINT_ARTIFACTS = "checkpoint"  # MLflow artifact folder of the final checkpoint
GRID_COLUMNS = 8  # samples per row of the sample grid (one row per class when conditional)


def crossed(before: int, after: int, every: int) -> bool:
    """Did the count pass a multiple of ``every`` going from ``before`` to ``after``?"""
    return after // every > before // every


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


class Progress:
    """Rank 0's line to the driver (a Ray queue), best effort: never blocks training."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def send(self, **fields: Any) -> None:
        if self.queue is None:
            return
        with contextlib.suppress(Exception):
            self.queue.actor.put_nowait.remote(fields)


@dataclass
class _Totals:
    """Sums over a log window or over the whole invocation."""

    loss: Any = 0.0  # a device tensor once steps are added (read at log time only)
    rows: Any = 0.0
    seconds: float = 0.0
    wait: float = 0.0
    images: int = 0

    def add(self, step: StepOutcome) -> None:
        self.loss = self.loss + step.loss_sum
        self.rows = self.rows + step.rows
        self.seconds += step.seconds
        self.wait += step.wait_seconds
        self.images += step.images

    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def wait_fraction(self) -> float:
        return self.wait / self.seconds if self.seconds > 0 else 0.0


class Events:
    """The interval events of one worker (see the module doc)."""

    def __init__(
        self,
        cfg: Config,
        ctx: RunContext,
        parts: TrainingParts,
        group: WorkerGroup,
        tracker: Any,
        progress: Progress,
    ) -> None:
        self.cfg, self.ctx, self.parts, self.group = cfg, ctx, parts, group
        self.tracker, self.progress = tracker, progress
        self.window, self.run = _Totals(), _Totals()
        self.last: dict[str, Any] = {"loss": math.nan, "lr": 0.0, "grad_norm": math.nan}
        self.data_epoch = parts.state.data_epoch
        # Steps this MLflow run already holds (logged before a restart or a re-run that
        # resumed an earlier checkpoint): redone steps are not logged a second time.
        self.logged_through = {
            key: tracker.last_step(key) for key in ("loss", "val_loss", "eval/fd")
        }
        self.last_quality: Any = None  # the last evaluation's Scores (tagged when registered)

    @property
    def chief(self) -> bool:
        return self.group.is_chief

    # ---- after every step
    def after_step(self, step: StepOutcome, before: int, epoch: int | None) -> dict | None:
        """Account for ``step``; fire the events due. Returns the metrics of a checkpoint."""
        t, state = self.cfg.train, self.parts.state
        if epoch is not None:
            if epoch > self.data_epoch and self.chief:  # the stream is past that epoch
                for ended in range(self.data_epoch, epoch):
                    self.progress.send(kind="epoch_end", epoch=ended)
            self.data_epoch = epoch
        self.window.add(step)
        self.run.add(step)
        self.last["lr"], self.last["grad_norm"] = step.lr, step.grad_norm
        after = state.images_seen
        final = after >= t.total_images
        if state.step % t.log_every_steps == 0 or final:
            self.log()
        if crossed(before, after, t.val_every_images) or final:
            self.validate()
        if crossed(before, after, t.grid_every_images) or final:
            self.grid()
        if t.eval_every_images and (crossed(before, after, t.eval_every_images) or final):
            self.evaluate()
        if crossed(before, after, t.checkpoint_every_images) or final:
            return self.checkpoint(final)
        return None

    def log(self) -> None:
        state, w = self.parts.state, self.window
        loss_sum, rows = self.group.sum([float(w.loss), float(w.rows)])
        metrics = {
            "loss": loss_sum / max(rows, 1.0),
            "lr": self.last["lr"],
            "grad_norm": float(self.last["grad_norm"]),
            "images_per_sec": w.rate(),
            "data_wait_fraction": w.wait_fraction(),
            "data_epoch": float(self.data_epoch),
        }
        self.last["loss"] = metrics["loss"]
        if self.chief:
            if state.images_seen > self.logged_through["loss"]:
                self.tracker.log_metrics(metrics, step=state.images_seen)
            self.progress.send(kind="log", images_seen=state.images_seen,
                               total_images=self.cfg.train.total_images, step=state.step,
                               **metrics)  # fmt: skip
        self.window = _Totals()

    def validate(self) -> float | None:
        val_set, state = self.ctx.val_set, self.parts.state
        if not self.chief or val_set is None:
            return None
        value = validation_loss(
            self.parts.ema.module, val_set, objective=Objective.from_config(self.cfg.train),
            batch_size=self.cfg.train.val_batch_size, device=self.group.device,
        )  # fmt: skip
        if state.images_seen > self.logged_through["val_loss"]:
            self.tracker.log_metrics({"val_loss": value}, step=state.images_seen)
        self.progress.send(kind="val", images_seen=state.images_seen, val_loss=value)
        state.val_loss = value
        return value

    def evaluate(self) -> None:
        """Rank 0: sample quality of the EMA weights (:mod:`pipeline.eval.probe`)."""
        probe, state = self.ctx.quality, self.parts.state
        if not self.chief or probe is None:
            return
        scores = probe.score(self.parts.ema.module, tuple(self.ctx.data_shape),
                             self.parts.num_classes, str(self.group.device))  # fmt: skip
        if state.images_seen > self.logged_through.get("eval/fd", -1):
            self.tracker.log_metrics(scores.metrics("eval/"), step=state.images_seen)
        self.last_quality = scores
        self.progress.send(kind="eval", images_seen=state.images_seen, n=scores.n, fd=scores.fd,
                           network=scores.network, accuracy=scores.accuracy)  # fmt: skip

    def grid(self) -> None:
        if not self.chief or not self.tracker.enabled:
            return
        from pipeline.viz import image_grid

        images, nrow = sample_grid(
            self.parts.ema.module, self.ctx.data_shape, seed=self.cfg.seed,
            steps=self.cfg.train.grid_steps, guidance_scale=self.cfg.sample.guidance_scale,
            device=self.group.device,
        )  # fmt: skip
        name = f"grids/images_{self.parts.state.images_seen:012d}.png"
        self.tracker.log_image(image_grid(images, nrow=nrow, scale=2), name)

    # ---- checkpoints
    def _metrics(self, final: bool) -> dict[str, Any]:
        state = self.parts.state
        return {
            "images_seen": state.images_seen,
            "step": state.step,
            "data_epoch": state.data_epoch,
            "loss": self.last["loss"],
            "val_loss": state.val_loss,
            "images_per_sec": self.run.rate(),
            "data_wait_fraction": self.run.wait_fraction(),
            "train_seconds": self.run.seconds,
            "mlflow_run_id": state.mlflow_run_id,
            "done": final,
        }

    def checkpoint(self, final: bool) -> dict[str, Any]:
        """Save (rank 0) and report (every rank) a checkpoint; register it when final."""
        parts, state = self.parts, self.parts.state
        state.data_epoch = self.group.min_int(self.data_epoch)
        rngs = self.group.gather(rng_state())
        metrics = self._metrics(final)
        tmp = None
        if self.chief:
            tmp = tempfile.mkdtemp(prefix="fmpipe-ckpt-")
            save_checkpoint(
                tmp, model=parts.net, ema=parts.ema.module, optimizer=parts.optimizer,
                state=state, config=self.cfg, rng=rngs,
            )  # fmt: skip
            if final and self.tracker.enabled:
                metrics.update(self._publish(tmp))
        name = checkpoint_dir_name(state.images_seen)
        try:
            report(metrics, tmp, name)
        except OSError as exc:  # Ray Train's copy into storage: disk full, S3 down, read-only
            where = f"{self.ctx.run_uri.rstrip('/')}/{name}" if self.ctx.run_uri else name
            raise StorageError(f"cannot write checkpoint {where}: {exc}") from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.chief:  # after report(): the line means the checkpoint is in storage
            self.progress.send(kind="checkpoint", images_seen=state.images_seen, final=final)
        return metrics

    def _publish(self, directory: str) -> dict[str, Any]:
        """The final checkpoint as run artifacts; a registered version (and alias) if asked."""
        t, state = self.cfg.train, self.parts.state
        artifact_path = f"{CHECKPOINT_ARTIFACTS}/images_{state.images_seen:012d}"
        self.tracker.flush()  # metrics an outage kept: sent (or this fails) before the model
        self.tracker.log_artifacts(directory, artifact_path)
        out: dict[str, Any] = {"checkpoint_artifacts": artifact_path}
        if not t.registered_model_name:
            return out
        tags = {
            "manifest_hash": state.manifest_hash,
            "images_seen": state.images_seen,
            "val_loss": "" if state.val_loss is None else f"{state.val_loss:.6g}",
            "run_name": t.run_name,
            **self.ctx.lineage,
        }
        if self.last_quality is not None:  # eval.<network>.fd, ... of the final weights
            prefix = f"eval.{self.cfg.eval.network}."
            tags.update({prefix + k: f"{v:.6g}" for k, v in self.last_quality.metrics().items()})
        version = self.tracker.register_model_version(t.registered_model_name, artifact_path, tags)
        if t.alias:
            self.tracker.set_alias(t.registered_model_name, t.alias, version)
            out["registered_alias"] = t.alias
        out.update(registered_model_name=t.registered_model_name, registered_version=version)
        return out

    def already_done(self) -> dict[str, Any]:
        """A finished run run again: report its state, train nothing."""
        state = self.parts.state
        metrics = {
            "images_seen": state.images_seen, "step": state.step, "data_epoch": state.data_epoch,
            "val_loss": state.val_loss, "mlflow_run_id": state.mlflow_run_id, "done": True,
            "images_per_sec": 0.0, "data_wait_fraction": 0.0, "train_seconds": 0.0,
        }  # fmt: skip
        self.progress.send(kind="done", images_seen=state.images_seen, already=True)
        report(metrics, None, None)
        return metrics
