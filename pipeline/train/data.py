"""Where training batches come from: the multi-epoch Ray Data stream, or in-memory tensors.

The training loop asks a :class:`BatchSource` for an iterator of *micro-batches* (dicts of
tensors ``x_1``, ``x_0`` float32, ``t`` float32, ``label`` int64 (-1 = unlabelled) and,
from the stream, ``epoch`` int64), exactly ``ctx.micro_batch`` rows each, ``grad_accum``
of them per optimizer step. Two sources:

- :class:`RayDataSource` (what ``fmpipe train`` uses): ``ray.train.get_dataset_shard("train")
  .iter_torch_batches(...)`` over the stream of :func:`build_train_stream`, with the
  configured coupling applied to each micro-batch on the worker (exact OT on the batch
  being trained on).
- :class:`InMemorySource`: deterministic global batches from tensors held in memory; the
  rank's slice of step ``s`` depends only on ``(seed, s)``, never on the worker count, so a
  1-worker and a 2-worker run see the same global batches (the DDP-exactness test), and a
  resumed run continues with the batches of an uninterrupted one.

The stream, one Dataset for the whole run. Its rows are ``(epoch, shard)`` pairs for the
epochs ``start_epoch, start_epoch + 1, ...`` (shards in each epoch's seeded order, from
:func:`pipeline.data.stream.shard_order`), expanded by one fused ``map_batches`` stage that
reads and decodes the shard (:class:`pipeline.data.stream.ShardDecoder`, samples shuffled
per (seed, epoch, shard)) and pairs each sample with noise and time drawn from
``(seed, epoch, key)`` (:class:`pipeline.data.coupling.PairingStage`). One pass covers
enough epochs to reach ``train.total_images`` (plus margin), so Ray Train splits one
stream across the workers (``streaming_split``) and the loop never restarts an iterator.
A re-run of the command (resume) builds the stream from the checkpoint's ``data_epoch``
(the epoch the slowest worker was reading; the part of it already seen is seen again).
After a worker restart *within* one invocation (``FailureConfig``), Ray Train splits the
same Dataset again, so the stream starts over at the epoch this invocation started from:
model, EMA, optimizer, RNG and images seen are restored exactly, only the data order
differs from an uninterrupted run.

Validation: :func:`load_val_set` reads the val split in this process, in key order, up to
``train.val_max_images`` samples, with ``x_0`` and ``t ~ U[0, 1)`` drawn from
``(seed, key)`` on their own stream ("val"): the draws never change with training
progress, so the validation loss is a deterministic function of the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pipeline.data.coupling import PairingStage, couple, noise_to_float, sample_generator
from pipeline.data.decode import DecodeSpec, to_model_range
from pipeline.data.stream import (
    DatasetInfo,
    ShardDecoder,
    bad_sample_tracker,
    read_shard,
    shard_order,
    skip_task_memory_polling,
)
from pipeline.storage import read_whole

if TYPE_CHECKING:
    import ray.data

    from pipeline.config import Config


def _spec(cfg: Config) -> DecodeSpec:
    return DecodeSpec(resolution=cfg.data.resolution, channels=cfg.data.channels)


__all__ = [
    "BatchSource",
    "InMemorySource",
    "MultiEpochDecoder",
    "RayDataSource",
    "SourceContext",
    "ValSet",
    "build_train_stream",
    "epochs_needed",
    "load_val_set",
]

BATCH_KEYS = ("x_1", "x_0", "t", "label")


@dataclass(frozen=True)
class SourceContext:
    """What a worker tells its batch source when the loop starts (or restarts)."""

    rank: int  # this worker's world rank
    world_size: int  # workers in the run
    micro_batch: int  # rows per yielded batch: batch_size / (world_size * grad_accum)
    grad_accum: int  # micro-batches per optimizer step
    batch_size: int  # global batch (images per optimizer step)
    images_seen: int  # where training starts: 0, or the resumed checkpoint's count
    data_epoch: int  # the resumed checkpoint's data epoch (0 on a fresh start)


class BatchSource(Protocol):
    """Yields micro-batches (dicts of tensors, ``ctx.micro_batch`` rows each) for one worker."""

    def batches(self, ctx: SourceContext) -> Iterator[dict[str, Tensor]]: ...


# --------------------------------------------------------------------------- the stream
def epochs_needed(remaining_images: int, samples_per_epoch: int, batch_size: int) -> int:
    """Epochs the stream must hold to feed ``remaining_images`` more images, with margin.

    One extra global batch (per-worker ``drop_last``, ``streaming_split`` evening-out) and
    two extra epochs (the partly consumed epoch a resume restarts, bad samples skipped
    within ``data.max_bad_fraction``).
    """
    if samples_per_epoch <= 0:
        raise ValueError("the training split has no samples")
    return math.ceil((max(remaining_images, 0) + batch_size) / samples_per_epoch) + 2


class MultiEpochDecoder:
    """``map_batches`` callable (batch_size=1): an ``(epoch, shard)`` row -> paired samples.

    Output blocks: ``x_1`` float32 ``(n, C, R, R)``, ``x_0`` (``data.noise_dtype``), ``t``
    float32, ``label`` int64, ``epoch`` int64. The sample key is dropped (it only seeds).
    """

    def __init__(self, cfg: Config, info: DatasetInfo, tracker: Any) -> None:
        # Both read each row's own epoch (rows carry it): the order, flips and pairs of
        # epoch e are those of the one-epoch stream of e (pipeline.data.stream).
        self.decoder = ShardDecoder(
            info.location,  # pickles as a rebuild recipe (see ShardDecoder)
            _spec(cfg),
            num_classes=info.manifest.num_classes,
            seed=cfg.seed,
            epoch=0,  # unused: every row has its epoch
            hflip=cfg.data.hflip,
            shuffle=cfg.data.shuffle_shards,
            tracker=tracker,
        )
        self.pairing = PairingStage.from_config(cfg, 0)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        if "epoch" not in batch:
            raise ValueError("MultiEpochDecoder rows need an 'epoch' column")
        for chunk in self.decoder(batch):
            paired = self.pairing(chunk)
            yield {name: paired[name] for name in ("x_1", "x_0", "t", "label", "epoch")}


def build_train_stream(
    cfg: Config, info: DatasetInfo, start_epoch: int, num_epochs: int
) -> ray.data.Dataset:
    """The lazy Dataset of epochs ``[start_epoch, start_epoch + num_epochs)`` (module doc)."""
    import ray.data

    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    by_name = {shard.name: shard for shard in info.shards}
    rows = [
        {
            "name": name,
            "path": by_name[name].path,
            "num_samples": by_name[name].num_samples,
            "epoch": epoch,
        }
        for epoch in range(start_epoch, start_epoch + num_epochs)
        for name in shard_order(list(by_name), cfg.seed, epoch, cfg.data.shuffle_shards)
    ]
    # One counter for the run: records are keyed by shard, and decoding a shard is the same
    # in every epoch, so counts never add up across epochs.
    tracker = bad_sample_tracker(cfg, info, start_epoch)
    compute = None
    if cfg.data.read_parallelism > 0:
        compute = ray.data.TaskPoolStrategy(size=cfg.data.read_parallelism)
    # Ray Data's default resource reservation stays on here (unlike the epoch stream of
    # pipeline.data.stream): beside a training worker, more decode tasks in flight only
    # take CPU from the step (measured: 300 vs 520 images/s, docs/benchmarks.md).
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    skip_task_memory_polling(ds)
    return ds.map_batches(MultiEpochDecoder(cfg, info, tracker), batch_size=1, compute=compute)


class RayDataSource:
    """Micro-batches from this worker's shard of the Ray Train dataset ``"train"``."""

    def __init__(
        self,
        *,
        coupling: str = "independent",
        ot_per_class: bool = False,
        prefetch_batches: int = 2,
        dataset_name: str = "train",
    ) -> None:
        self.coupling = coupling
        self.ot_per_class = ot_per_class
        self.prefetch_batches = prefetch_batches
        self.dataset_name = dataset_name

    def batches(self, ctx: SourceContext) -> Iterator[dict[str, Tensor]]:
        import ray.train

        shard = ray.train.get_dataset_shard(self.dataset_name)
        if shard is None:
            raise RuntimeError(
                f"no Ray Train dataset '{self.dataset_name}': pass datasets={{'train': ...}} "
                "to the trainer, or give the loop another batch_source"
            )
        for batch in shard.iter_torch_batches(
            batch_size=ctx.micro_batch,
            prefetch_batches=self.prefetch_batches,
            drop_last=True,
            device="cpu",
        ):
            x_0 = noise_to_float(batch["x_0"])
            label = batch["label"].long()
            if self.coupling != "independent":
                x_0 = couple(batch["x_1"], x_0, label if self.ot_per_class else None,
                             self.coupling, self.ot_per_class)  # fmt: skip
            yield {
                "x_1": batch["x_1"].float(),
                "x_0": x_0,
                "t": batch["t"].float(),
                "label": label,
                "epoch": batch["epoch"].long(),
            }


# --------------------------------------------------------------------------- in memory
class InMemorySource:
    """Deterministic global batches from in-memory images (tests, benchmarks).

    Step ``s`` takes rows ``(s * B + i) % N`` of ``x_1`` (``B`` = global batch) and draws
    ``x_0 ~ N(0, I)`` and ``t ~ U[0, 1)`` from a generator seeded by ``(seed, s)``. The
    global batch is laid out as ``[micro j][rank k][row]``: rank ``k``'s ``j``-th
    micro-batch of the step is rows ``j * B / A + k * m + [0, m)``.
    """

    def __init__(
        self, x_1: Tensor, label: Tensor | None = None, seed: int = 0, epoch_size: int | None = None
    ) -> None:
        if x_1.ndim < 2 or len(x_1) == 0:
            raise ValueError("x_1 must be a non-empty batch of samples (N, ...)")
        self.x_1 = x_1.float().cpu()
        n = len(x_1)
        self.label = (
            label.long().cpu() if label is not None else torch.full((n,), -1, dtype=torch.long)
        )
        self.seed = int(seed)
        self.epoch_size = epoch_size or n

    def global_batch(self, step: int, batch_size: int) -> dict[str, Tensor]:
        """The whole global batch of optimizer step ``step``."""
        n = len(self.x_1)
        index = (step * batch_size + torch.arange(batch_size)) % n
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x_0 = torch.randn((batch_size, *self.x_1.shape[1:]), generator=gen)
        t = torch.rand(batch_size, generator=gen)
        epoch = (step * batch_size + torch.arange(batch_size)) // self.epoch_size
        return {
            "x_1": self.x_1[index],
            "x_0": x_0,
            "t": t,
            "label": self.label[index],
            "epoch": epoch,
        }

    def batches(self, ctx: SourceContext) -> Iterator[dict[str, Tensor]]:
        if ctx.images_seen % ctx.batch_size:
            raise ValueError("InMemorySource resumes only at whole steps")
        step = ctx.images_seen // ctx.batch_size
        chunk = ctx.batch_size // ctx.grad_accum
        while True:
            full = self.global_batch(step, ctx.batch_size)
            for j in range(ctx.grad_accum):
                lo = j * chunk + ctx.rank * ctx.micro_batch
                yield {k: v[lo : lo + ctx.micro_batch] for k, v in full.items()}
            step += 1


# --------------------------------------------------------------------------- validation
@dataclass
class ValSet:
    """Fixed validation draws: ``x_1``, ``x_0`` ``(N, C, H, W)``, ``t`` ``(N,)``, ``label``."""

    x_1: Tensor
    x_0: Tensor
    t: Tensor
    label: Tensor  # int64, -1 = unlabelled
    keys: list[str]

    def __len__(self) -> int:
        return len(self.x_1)


def load_val_set(cfg: Config, info: DatasetInfo, max_images: int) -> ValSet:
    """The first ``max_images`` val samples in key order, with fixed ``(x_0, t)`` draws.

    Reads the shards in this process (no Ray); bad samples are skipped as in training.
    ``x_0`` and then ``t ~ U[0, 1)`` come from ``sample_generator(seed, 0, key, "val")``.
    """
    spec = _spec(cfg)
    samples: list[tuple[str, int, np.ndarray]] = []
    for shard in sorted(info.shards, key=lambda s: s.name):
        data = read_whole(info.filesystem, shard.path)
        got, _ = read_shard(data, shard.name, shard.num_samples, spec,
                            num_classes=info.manifest.num_classes)  # fmt: skip
        samples.extend(got)
    samples.sort(key=lambda s: s[0])
    samples = samples[:max_images]
    if not samples:
        raise ValueError(f"the val split of {info.uri} has no readable samples")
    x_1 = torch.from_numpy(to_model_range(np.stack([img for _, _, img in samples])))
    x_0 = torch.empty_like(x_1)
    t = torch.empty(len(samples))
    for i, (key, _, _) in enumerate(samples):
        gen = sample_generator(cfg.seed, 0, key, stream="val")
        torch.randn(x_1.shape[1:], generator=gen, out=x_0[i])
        t[i] = torch.rand(1, generator=gen)[0]
    label = torch.tensor([lab for _, lab, _ in samples], dtype=torch.long)
    return ValSet(x_1=x_1, x_0=x_0, t=t, label=label, keys=[k for k, _, _ in samples])
