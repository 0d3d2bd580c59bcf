"""Distillation: a k-step student that lands on the coupled ``x_1`` from ``x_0``.

On a coupled set (a flow's own pairs ``(x_0, x_1 = Phi(x_0))``, usually a reflowed one) a
student ``v`` is trained so that ``k`` Euler steps on the grid ``s_j = j / k`` reach
``x_1``. Each pair is trained at one grid point ``s`` (the row's ``t`` rounded down to the
grid): from the point of the straight pair path ``x_s = s x_1 + (1 - s) x_0`` one jump to
t = 1 must land on ``x_1``,

    x_hat_1 = x_s + (1 - s) v(x_s, s),   loss = d(x_hat_1, x_1),

with ``x_hat_1 - x_1 = (1 - s) (v - (x_1 - x_0))``. For ``k = 1`` only ``s = 0``: the student
maps noise to the sample in one call (Liu et al. 2022, "distill").

Where the intermediate states come from (``train.distill_states``, :data:`DISTILL_STATES`):

- ``pair_path``: the straight pair path above, which is where a perfect student's (and a
  well reflowed flow's) k-step path runs;
- ``rollout``: the student's own Euler states, ``x_hat_0 = x_0``,
  ``x_hat_{s+1/k} = x_hat_s + v(x_hat_s, s) / k`` (current weights, no gradient), so each
  jump is trained from the states its sampler reaches, and the last jump's loss is the
  sampler's own final miss. Off the pair path by the earlier jumps' misses, which a
  ``pair_path`` student never sees in training; costs ``(k - 1) / 2`` forward passes per
  row on average (row s = j / k needs j);
- ``unrolled``: every row at the last grid time ``s = (k - 1) / k``, its state the
  student's own k - 1 jumps from ``x_0`` *with* the gradient through them, so the loss is
  the whole k-step sampler's final miss ``d(x_hat_1, x_1)``, trained end to end (the
  intermediate states are free to leave the pair path); k forward and backward passes per
  row.

The landing from any state ``x_s``: ``x_hat_1 = x_s + (1 - s) v(x_s, s)``.

Distances ``d`` (per sample, over all of its elements):

- ``l2``: ``mean (x_hat_1 - x_1)^2``, the CFM loss at the grid times weighted by (1 - s)^2;
- ``pseudo_huber``: ``sqrt(||x_hat_1 - x_1||^2 + c^2) - c`` with ``c = 0.00054 sqrt(D)``
  (D elements per sample; Song & Dhariwal 2023, "Improved techniques for training consistency
  models"): L2 near 0, L1-like for large errors, so a few pairs the base integrated badly
  pull less. Needs no network download (unlike LPIPS).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "DISTILL_LOSSES",
    "DISTILL_STATES",
    "distill_loss_per_sample",
    "grid_times",
    "pseudo_huber_c",
    "rollout_states",
]

DISTILL_LOSSES = ("l2", "pseudo_huber")
DISTILL_STATES = ("pair_path", "rollout", "unrolled")


def grid_times(t: Tensor, steps: int) -> Tensor:
    """``t`` in [0, 1] rounded down to the k-step grid ``{0, 1/k, ..., (k-1)/k}``."""
    if steps < 1:
        raise ValueError(f"distillation needs steps >= 1, got {steps}")
    return (t.clamp(0.0, 1.0) * steps).floor().clamp(max=steps - 1) / steps


def pseudo_huber_c(elements: int) -> float:
    """The pseudo-Huber scale for samples of ``elements`` values: ``0.00054 sqrt(D)``."""
    return 0.00054 * math.sqrt(elements)


def rollout_states(
    velocity: Callable[[Tensor, Tensor, Tensor], Tensor],
    x_0: Tensor,
    s: Tensor,
    steps: int,
    *,
    grad: bool = False,
) -> Tensor:
    """The student's own Euler states at grid times ``s`` from ``x_0`` (module doc).

    Args:
        velocity: ``velocity(x, t, rows)`` -> v(x, t), for the rows ``rows`` (index tensor
            into the batch, so a caller can pick their labels) of the batch.
        x_0: (B, ...) noise; s: (B,) times on the ``steps``-step grid (:func:`grid_times`).
        grad: keep the graph through the jumps (``unrolled``); else no gradient.
    Returns:
        (B, ...) float32 states: row i after ``s_i * steps`` jumps (``x_0`` where s_i = 0).
    """
    jumps = (s * steps).round().long()
    x = x_0.float()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for j in range(int(jumps.max()) if len(jumps) else 0):
            rows = (jumps > j).nonzero().squeeze(1)  # only rows not yet at their s
            t_j = torch.full((len(rows),), j / steps, device=x.device)
            moved = x[rows] + velocity(x[rows], t_j, rows).float() / steps
            x = x.index_put((rows,), moved)  # out of place: the graph keeps each state
    return x


def distill_loss_per_sample(
    velocity: Tensor, x_s: Tensor, x_1: Tensor, s: Tensor, loss: str = "pseudo_huber"
) -> Tensor:
    """Per-sample distance ``d(x_hat_1, x_1)`` of the landing ``x_hat_1 = x_s + (1 - s) v``
    (module doc), shape (B,).

    Args:
        velocity: ``v(x_s, s)`` (B, ...) at the states x_s (B, ...); x_1 the coupled
            targets (B, ...); s (B,) grid times.
        loss: one of :data:`DISTILL_LOSSES`.
    """
    if not velocity.shape == x_s.shape == x_1.shape:
        raise ValueError(
            f"velocity, x_s and x_1 must share one shape; got {tuple(velocity.shape)}, "
            f"{tuple(x_s.shape)}, {tuple(x_1.shape)}"
        )
    remaining = (1.0 - s).reshape(-1, *([1] * (velocity.ndim - 1)))
    miss = (x_s + remaining * velocity - x_1).flatten(start_dim=1)  # x_hat_1 - x_1
    if loss == "l2":
        return miss.square().mean(dim=1)
    if loss == "pseudo_huber":
        c = pseudo_huber_c(miss.shape[1])
        return torch.sqrt(miss.square().sum(dim=1) + c * c) - c
    raise ValueError(f"unknown distillation loss {loss!r}; allowed: {', '.join(DISTILL_LOSSES)}")
