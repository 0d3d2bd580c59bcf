"""What training minimises, in one place for the optimizer step and the validation loss.

- ``cfm`` (flow matching): at the row's own ``t``,
  ``loss = mean_elements (v(x_t, t) - (x_1 - x_0))^2`` with ``x_t = t x_1 + (1 - t) x_0``.
- ``distill`` (a K-step student, :mod:`pipeline.flow.distill`): ``t`` on the grid
  ``{0, 1/K, ..., (K-1)/K}`` and ``loss = d(x_t + (1 - t) v(x_t, t), x_1)``, the distance
  (``l2`` | ``pseudo_huber``) from where one jump lands to the coupled ``x_1``. By
  ``distill_states``: ``pair_path``, ``t`` rounded down to the grid and ``x_t`` on the
  straight pair path; ``rollout``, the same ``t`` and ``x_t`` the student's own Euler state
  after ``t K`` jumps from ``x_0`` (no gradient); ``unrolled``, every row at ``(K-1)/K``
  after its own K - 1 jumps *with* the gradient, so the loss is the K-step sampler's final
  miss.

So a student's validation loss is its own held-out landing distance at its grid times, not
the CFM loss at arbitrary ``t``: off-grid velocities are not what it is trained for, and
their error growing says nothing about how well its K steps land.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import TrainConfig
from pipeline.flow import CondOTPath, cfm_loss_per_sample
from pipeline.flow.distill import distill_loss_per_sample, grid_times, rollout_states

__all__ = ["Objective", "velocity_on_rows"]


@dataclass(frozen=True)
class Objective:
    """``train.objective`` with its settings (``distill_steps``, ``distill_loss``,
    ``distill_states``)."""

    name: str = "cfm"  # cfm | distill
    distill_steps: int = 1
    distill_loss: str = "pseudo_huber"
    distill_states: str = "unrolled"  # as TrainConfig's

    @classmethod
    def from_config(cls, train: TrainConfig) -> Objective:
        return cls(train.objective, train.distill_steps, train.distill_loss, train.distill_states)

    def times(self, t: Tensor) -> Tensor:
        """The times the network is trained at, (B,): ``t`` itself, or on the K-step grid
        (an ``unrolled`` student's all at its last grid time, (K - 1) / K)."""
        if self.name != "distill":
            return t
        if self.distill_states == "unrolled":
            return torch.full_like(t, (self.distill_steps - 1) / self.distill_steps)
        return grid_times(t, self.distill_steps)

    def sampling_rule(self) -> tuple[str, int] | None:
        """``(solver, steps)`` a model trained on this objective is meant to be sampled with:
        a K-step student's ``("euler", K)`` (the grid it lands from), None for CFM (any)."""
        return ("euler", self.distill_steps) if self.name == "distill" else None

    def states(
        self,
        x_0: Tensor,
        x_1: Tensor,
        t: Tensor,
        velocity: Callable[[Tensor, Tensor, Tensor], Tensor],
    ) -> Tensor:
        """The network's inputs ``x_t`` (B, ...) at ``t`` from :meth:`times`: the pair path
        ``t x_1 + (1 - t) x_0``, or a rollout / unrolled student's own states, for which
        ``velocity(x, t, rows)`` (the current weights on rows ``rows`` of the batch) is
        called, without gradient (rollout) or with it (unrolled)."""
        if self.name == "distill" and self.distill_states in ("rollout", "unrolled"):
            unrolled = self.distill_states == "unrolled"
            return rollout_states(velocity, x_0, t, self.distill_steps, grad=unrolled)
        return CondOTPath().sample(x_0=x_0, x_1=x_1, t=t).x_t

    def per_sample(
        self, velocity: Tensor, x_0: Tensor, x_1: Tensor, x_t: Tensor, t: Tensor
    ) -> Tensor:
        """Per-sample loss (B,) of ``velocity = v(x_t, t)`` (B, ...) at the inputs from
        :meth:`states`."""
        if self.name == "distill":
            return distill_loss_per_sample(velocity, x_t, x_1, t, self.distill_loss)
        return cfm_loss_per_sample(velocity, x_0, x_1)


def velocity_on_rows(
    net: nn.Module, label: Tensor | None
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``velocity(x, t, rows)`` of ``net`` for the rows ``rows`` of a batch labelled ``label``
    (None: unconditional), as :meth:`Objective.states` calls it."""
    return lambda x, t, rows: net(x, t, None if label is None else label[rows])
