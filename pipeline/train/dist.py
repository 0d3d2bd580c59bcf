"""A worker's place in the Ray Train run and the few collectives the loop needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["WorkerGroup", "report"]


class WorkerGroup:
    """Rank, world size and the loop's collectives (no-ops on one worker).

    ``sum`` adds floats over ranks (float64, on the worker's device so NCCL can carry it),
    ``min_int`` takes the smallest integer (the data epoch of the slowest worker), and
    ``gather`` collects one picklable object per rank (RNG states) on every rank.
    """

    def __init__(
        self, device: torch.device, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        """From the Ray Train context; or, given ``rank`` and ``world_size``, for parts of
        the loop run outside Ray Train (unit tests, benchmarks: one process)."""
        if rank is None or world_size is None:
            import ray.train

            context = ray.train.get_context()
            self.rank = context.get_world_rank()
            self.world_size = context.get_world_size()
            self.local_world_size = max(1, context.get_local_world_size())
        else:
            self.rank, self.world_size, self.local_world_size = rank, world_size, 1
        self.device = device
        self.on = self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_chief(self) -> bool:
        """Rank 0: the one that writes MLflow, checkpoints and progress lines."""
        return self.rank == 0

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


def report(metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
    """``ray.train.report`` from every rank (a barrier); rank 0 passes the directory."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
