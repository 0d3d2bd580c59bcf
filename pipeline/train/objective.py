"""What training minimises, in one place for the optimizer step and the validation loss.

- ``cfm`` (flow matching): at the row's own ``t``,
  ``loss = mean_elements (v(x_t, t) - (x_1 - x_0))^2`` with ``x_t = t x_1 + (1 - t) x_0``.
- ``distill`` (a K-step student, :mod:`pipeline.flow.distill`): ``t`` rounded down to the
  grid ``{0, 1/K, ..., (K-1)/K}`` and ``loss = d(x_t + (1 - t) v(x_t, t), x_1)``, the
  distance (``l2`` | ``pseudo_huber``) from where one jump lands to the coupled ``x_1``.

So a student's validation loss is its own held-out landing distance at its grid times, not
the CFM loss at arbitrary ``t``: off-grid velocities are not what it is trained for, and
their error growing says nothing about how well its K steps land.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline.config import TrainConfig
from pipeline.flow import cfm_loss_per_sample
from pipeline.flow.distill import distill_loss_per_sample, grid_times

__all__ = ["Objective"]


@dataclass(frozen=True)
class Objective:
    """``train.objective`` with its settings (``distill_steps``, ``distill_loss``)."""

    name: str = "cfm"  # cfm | distill
    distill_steps: int = 1
    distill_loss: str = "pseudo_huber"

    @classmethod
    def from_config(cls, train: TrainConfig) -> Objective:
        return cls(train.objective, train.distill_steps, train.distill_loss)

    def times(self, t: Tensor) -> Tensor:
        """The times the network is trained at, (B,): ``t`` itself, or on the K-step grid."""
        return grid_times(t, self.distill_steps) if self.name == "distill" else t

    def sampling_rule(self) -> tuple[str, int] | None:
        """``(solver, steps)`` a model trained on this objective is meant to be sampled with:
        a K-step student's ``("euler", K)`` (the grid it lands from), None for CFM (any)."""
        return ("euler", self.distill_steps) if self.name == "distill" else None

    def per_sample(self, velocity: Tensor, x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
        """Per-sample loss (B,) of ``velocity = v(x_t, t)`` (B, ...) at ``t`` from :meth:`times`."""
        if self.name == "distill":
            return distill_loss_per_sample(velocity, x_0, x_1, t, self.distill_loss)
        return cfm_loss_per_sample(velocity, x_0, x_1)
