"""Rectified flow (reflow): retrain a flow on the couplings a flow itself produced.

A trained flow ``v`` maps each noise ``x_0`` to ``x_1 = Phi_v(x_0)`` (its ODE solution).
Reflow (Liu, Gong, Liu 2022, "Flow straight and fast") trains a new flow ``v'`` with the
same CFM loss, but on the fixed pairs ``(x_0, Phi_v(x_0))`` instead of independent draws:

    L = E_{t, x_0} || v'(x_t, t) - (Phi_v(x_0) - x_0) ||^2,   x_t = t Phi_v(x_0) + (1 - t) x_0.

The pairs are a deterministic coupling, so conditional paths no longer cross where they
did under the independent coupling, the learnt marginal velocity moves each point nearly
straight, and a few Euler steps land where many did before. ``k``-rectified flow repeats
this ``k`` times. The marginal at t = 1 stays the base flow's: reflow cannot fix what the
base gets wrong, only how many steps it needs.

Straightness of a flow ``Z`` (the same paper's measure): how far its velocity along its own
path departs from the straight displacement,

    S(Z) = int_0^1 E || (Z_1 - Z_0) - v(Z_t, t) ||^2 dt,

zero exactly for straight paths at constant speed (where 1-step Euler is exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.flow.solvers import VelocityFn, solve_ode

__all__ = ["couple_by_flow", "straightness"]


@torch.no_grad()
def couple_by_flow(
    velocity_fn: VelocityFn, x_0: Tensor, *, solver: str = "euler", steps: int | None = 64
) -> Tensor:
    """``x_1 = Phi_v(x_0)``: the base flow's sample for each noise, shape of ``x_0``.

    The pairs ``(x_0, x_1)`` are what reflow trains on; ``steps`` None for dopri5.
    """
    return solve_ode(velocity_fn, x_0, method=solver, steps=steps).x_1


@torch.no_grad()
def straightness(velocity_fn: VelocityFn, x_0: Tensor, steps: int = 64) -> float:
    """``S(Z)`` of the flow from ``x_0`` (B, ...), estimated along its ``steps``-step Euler
    path: the mean over steps and samples of ``||(Z_1 - Z_0) - v(Z_k, t_k)||^2`` (summed over
    a sample's elements). Euler's state differences give ``v(Z_k, t_k)`` exactly
    (``(Z_{k+1} - Z_k) * steps``), so no extra network call is made."""
    if steps < 1:
        raise ValueError(f"straightness needs steps >= 1, got {steps}")
    solution = solve_ode(velocity_fn, x_0, method="euler", steps=steps, return_trajectory=True)
    path = solution.trajectory  # (steps + 1, B, ...)
    assert path is not None
    velocities = (path[1:] - path[:-1]) * steps  # (steps, B, ...)
    displacement = path[-1] - path[0]  # (B, ...)
    gap = (velocities - displacement).flatten(2).pow(2).sum(-1)  # (steps, B)
    return float(gap.mean())
