"""Distillation: a k-step student that lands on the coupled ``x_1`` from ``x_0``.

On a coupled set (a flow's own pairs ``(x_0, x_1 = Phi(x_0))``, usually a reflowed one) a
student ``v`` is trained so that ``k`` Euler steps on the grid ``s_j = j / k`` reach
``x_1``. Each pair is trained at one grid point ``s`` (the row's ``t`` rounded down to the
grid): from the point of the straight pair path ``x_s = s x_1 + (1 - s) x_0`` one jump to
t = 1 must land on ``x_1``,

    x_hat_1 = x_s + (1 - s) v(x_s, s),   loss = d(x_hat_1, x_1),

with ``x_hat_1 - x_1 = (1 - s) (v - (x_1 - x_0))``. For ``k = 1`` only ``s = 0``: the student
maps noise to the sample in one call (Liu et al. 2022, "distill"). Intermediate points lie
on the straight pair path, which is where a reflowed flow's k-step path runs.

Distances ``d`` (per sample, over all of its elements):

- ``l2``: ``mean (x_hat_1 - x_1)^2``, the CFM loss at the grid times weighted by (1 - s)^2;
- ``pseudo_huber``: ``sqrt(||x_hat_1 - x_1||^2 + c^2) - c`` with ``c = 0.00054 sqrt(D)``
  (D elements per sample; Song & Dhariwal 2023, "Improved techniques for training consistency
  models"): L2 near 0, L1-like for large errors, so a few pairs the base integrated badly
  pull less. Needs no network download (unlike LPIPS).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DISTILL_LOSSES", "distill_loss_per_sample", "grid_times", "pseudo_huber_c"]

DISTILL_LOSSES = ("l2", "pseudo_huber")


def grid_times(t: Tensor, steps: int) -> Tensor:
    """``t`` in [0, 1] rounded down to the k-step grid ``{0, 1/k, ..., (k-1)/k}``."""
    if steps < 1:
        raise ValueError(f"distillation needs steps >= 1, got {steps}")
    return (t.clamp(0.0, 1.0) * steps).floor().clamp(max=steps - 1) / steps


def pseudo_huber_c(elements: int) -> float:
    """The pseudo-Huber scale for samples of ``elements`` values: ``0.00054 sqrt(D)``."""
    return 0.00054 * math.sqrt(elements)


def distill_loss_per_sample(
    velocity: Tensor, x_0: Tensor, x_1: Tensor, s: Tensor, loss: str = "pseudo_huber"
) -> Tensor:
    """Per-sample distance ``d(x_hat_1, x_1)`` (module doc), shape (B,).

    Args:
        velocity: ``v(x_s, s)`` (B, ...), x_0 and x_1 the pair (B, ...), s (B,) grid times.
        loss: one of :data:`DISTILL_LOSSES`.
    """
    if not velocity.shape == x_0.shape == x_1.shape:
        raise ValueError(
            f"velocity, x_0 and x_1 must share one shape; got {tuple(velocity.shape)}, "
            f"{tuple(x_0.shape)}, {tuple(x_1.shape)}"
        )
    remaining = (1.0 - s).reshape(-1, *([1] * (velocity.ndim - 1)))
    miss = (remaining * (velocity - (x_1 - x_0))).flatten(start_dim=1)  # x_hat_1 - x_1
    if loss == "l2":
        return miss.square().mean(dim=1)
    if loss == "pseudo_huber":
        c = pseudo_huber_c(miss.shape[1])
        return torch.sqrt(miss.square().sum(dim=1) + c * c) - c
    raise ValueError(f"unknown distillation loss {loss!r}; allowed: {', '.join(DISTILL_LOSSES)}")
