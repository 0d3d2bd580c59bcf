"""ODE solvers for sampling: integrate ``dx/dt = v(x, t)`` from noise (t = 0) to data (t = 1).

Fixed-step methods (exact function evaluations, NFE, per step):

    euler     x + h v(x, t)                                                   1
    midpoint  x + h v(x + h/2 k1, t + h/2)                                    2
    heun      x + h/2 (k1 + k2),  k2 = v(x + h k1, t + h)  (explicit trapezoid) 2
    rk4       classical Runge-Kutta 4                                         4

``dopri5`` is the adaptive Dormand-Prince 5(4) pair with FSAL (the last stage of an accepted
step is the first of the next), RMS error norm with per-element scale
``atol + rtol * max(|x|, |x_new|)``, and the usual step-size controller
``h *= clamp(0.9 * err^(-1/5), 0.2, 10)`` (no growth right after a rejection).

Orders of global error: euler 1, midpoint 2, heun 2, rk4 4, dopri5 5 (error controlled locally).

Which solvers take ``steps`` (and which use ``atol``/``rtol``) is said once, in
:data:`SOLVER_SPECS`; callers ask :func:`effective_steps` / :func:`effective_tolerances` /
:func:`is_adaptive` instead of comparing names, so a new solver is one table entry.

No ``torch.no_grad()`` here: callers sampling for inference should wrap the call themselves;
tests and adjoint-free training through the solver need the graph.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.flow.solver_specs import (
    ADAPTIVE_SOLVERS,
    FIXED_STEP_SOLVERS,
    SOLVER_SPECS,
    SOLVERS,
    SolverSpec,
    effective_steps,
    effective_tolerances,
    is_adaptive,
    nfe_per_step,
    solver_spec,
)

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_STEP_SOLVERS",
    "SOLVERS",
    "SOLVER_SPECS",
    "ODESolution",
    "SolverSpec",
    "VelocityFn",
    "effective_steps",
    "effective_tolerances",
    "is_adaptive",
    "nfe_per_step",
    "solve_ode",
    "solver_spec",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``velocity_fn(x, t)``: x of shape (B, ...), t of shape (B,) -> velocity of shape (B, ...)."""


# Dormand-Prince 5(4) tableau. _DP_B5 is the 5th-order solution (also the 7th stage's row,
# which is what makes FSAL possible); _DP_E = b5 - b4 estimates the local error.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A: tuple[tuple[float, ...], ...] = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4, strict=True))

_SAFETY = 0.9
_MIN_FACTOR = 0.2
_MAX_FACTOR = 10.0


@dataclass
class ODESolution:
    """Result of :func:`solve_ode`.

    Attributes:
        x_1: state at the final time, shape (B, ...).
        nfe: exact number of ``velocity_fn`` calls.
        trajectory: with ``return_trajectory``, states at ``times``, shape (K + 1, B, ...);
            else None. K is the number of steps (fixed-step), the number of ``time_grid``
            intervals (dopri5 with a grid) or of accepted steps (dopri5 without a grid).
        times: the K + 1 times of ``trajectory``, shape (K + 1,), on x's device in x's dtype
            (at least float32); None without trajectory.
    """

    x_1: Tensor
    nfe: int
    trajectory: Tensor | None = None
    times: Tensor | None = None


class _Counted:
    """Wraps ``velocity_fn``: broadcasts scalar t to (B,), checks shapes, counts calls."""

    def __init__(self, fn: VelocityFn, x: Tensor) -> None:
        self.fn = fn
        self.batch = x.shape[0]
        self.shape = x.shape
        self.dtype = x.dtype
        self.device = x.device
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        t_b = torch.as_tensor(t, dtype=self.dtype, device=self.device).reshape(1)
        v = self.fn(x, t_b.expand(self.batch))
        self.nfe += 1
        if v.shape != self.shape:
            raise ValueError(
                f"velocity_fn must return the shape of x {tuple(self.shape)}; got {tuple(v.shape)}"
            )
        return v


def _check_args(
    method: str,
    x_0: Tensor,
    steps: int | None,
    time_grid: Tensor | None,
    atol: float,
    rtol: float,
    max_steps: int,
) -> None:
    if not isinstance(method, str) or method not in SOLVER_SPECS:
        raise ValueError(f"method must be one of {', '.join(SOLVERS)}; got {method!r}")
    adaptive = SOLVER_SPECS[method].adaptive
    if not isinstance(x_0, Tensor) or x_0.ndim < 1:
        raise ValueError("x_0 must be a tensor with a batch dimension: shape (B, ...)")
    if not x_0.is_floating_point():
        raise ValueError(f"x_0 must have a floating dtype; got {x_0.dtype}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1; got {steps!r}")
        if time_grid is not None:
            raise ValueError("pass either steps or time_grid, not both")
        if adaptive:
            raise ValueError(
                f"steps is for fixed-step methods; {method} chooses its own steps "
                "(use atol/rtol, or time_grid for output times)"
            )
    elif time_grid is None and not adaptive:
        raise ValueError(f"method {method!r} needs steps (an int >= 1) or a time_grid")
    if time_grid is not None:
        if not isinstance(time_grid, Tensor) or time_grid.ndim != 1 or time_grid.numel() < 2:
            raise ValueError("time_grid must be a 1-D tensor with at least 2 times")
        if not torch.isfinite(time_grid).all():
            raise ValueError("time_grid must be finite")
        if not (time_grid[1:] > time_grid[:-1]).all():
            raise ValueError("time_grid must be strictly increasing (integration runs forward)")
    if adaptive:
        if not (atol >= 0 and rtol >= 0 and atol + rtol > 0):
            raise ValueError(f"atol and rtol must be >= 0, not both 0; got {atol}, {rtol}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1; got {max_steps!r}")


def solve_ode(
    velocity_fn: VelocityFn,
    x_0: Tensor,
    method: str = "euler",
    steps: int | None = None,
    time_grid: Tensor | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
    max_steps: int = 10000,
) -> ODESolution:
    """Integrate ``dx/dt = velocity_fn(x, t)`` from ``x_0`` over [0, 1] or along ``time_grid``.

    Args:
        velocity_fn: ``(x (B, ...), t (B,)) -> (B, ...)``; t is in x's dtype and device.
        x_0: initial state (noise at t = 0), shape (B, ...), floating dtype.
        method: one of :data:`SOLVERS`.
        steps: number of uniform steps on [0, 1] for fixed-step methods.
        time_grid: strictly increasing 1-D times instead of ``steps``. Fixed-step methods step
            exactly on it; dopri5 integrates from its first to its last time, landing on each
            grid time (its trajectory is then reported there).
        atol, rtol: dopri5 tolerances on the local error.
        return_trajectory: also return the states at every step/grid time.
        max_steps: dopri5 limit on attempted (accepted + rejected) steps.

    Returns:
        :class:`ODESolution` with the final state and the exact NFE.

    Raises:
        ValueError: on an unknown method, missing/invalid ``steps`` or ``time_grid``,
            invalid tolerances or a ``velocity_fn`` output of the wrong shape.
        RuntimeError: if dopri5 needs more than ``max_steps`` steps or its step underflows.
    """
    _check_args(method, x_0, steps, time_grid, atol, rtol, max_steps)
    f = _Counted(velocity_fn, x_0)
    # Time bookkeeping in Python floats (float64), whatever x's dtype: a bfloat16 grid would
    # round times (even to zero-length steps), and host floats avoid tiny device kernels.
    if time_grid is not None:
        grid = time_grid.detach().to("cpu", torch.float64).tolist()
    elif SOLVER_SPECS[method].adaptive:
        grid = [0.0, 1.0]
    else:
        assert steps is not None
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()

    if method == "dopri5":
        # Report the trajectory at the grid only when the caller asked for output times.
        x_1, states, times = _dopri5(
            f, x_0, grid, atol, rtol, max_steps, return_trajectory, at_grid=time_grid is not None
        )
    else:
        x_1, states = _fixed(f, x_0, grid, method, return_trajectory)
        times = grid
    if not return_trajectory:
        return ODESolution(x_1=x_1, nfe=f.nfe)
    times_dtype = torch.promote_types(x_0.dtype, torch.float32)
    return ODESolution(
        x_1=x_1,
        nfe=f.nfe,
        trajectory=torch.stack(states),
        times=torch.tensor(times, dtype=times_dtype, device=x_0.device),
    )


def _fixed(
    f: _Counted, x: Tensor, grid: list[float], method: str, keep: bool
) -> tuple[Tensor, list[Tensor]]:
    states = [x] if keep else []
    for t, t_next in itertools.pairwise(grid):
        h = t_next - t
        if method == "euler":
            x = x + h * f(x, t)
        elif method == "midpoint":
            k1 = f(x, t)
            x = x + h * f(x + (h / 2) * k1, t + h / 2)
        elif method == "heun":
            k1 = f(x, t)
            # Evaluate the corrector at the grid time itself rather than t + h (same value in
            # exact arithmetic) so the last stage sits exactly on t = 1.
            k2 = f(x + h * k1, t_next)
            x = x + (h / 2) * (k1 + k2)
        else:  # rk4
            k1 = f(x, t)
            k2 = f(x + (h / 2) * k1, t + h / 2)
            k3 = f(x + (h / 2) * k2, t + h / 2)
            k4 = f(x + h * k3, t_next)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        if keep:
            states.append(x)
    return x, states


def _rms(x: Tensor) -> float:
    # Step-size control is not differentiated through: only the accepted states carry graph.
    return float(x.detach().square().mean().sqrt())


def _initial_step(
    f: _Counted, x: Tensor, t0: float, span: float, k1: Tensor, atol: float, rtol: float
) -> float:
    """Hairer, Norsett & Wanner (II.4) starting step; costs one velocity evaluation."""
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(k1 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)  # never probe the model outside the integration interval
    k2 = f(x + h0 * k1, t0 + h0)
    d2 = _rms((k2 - k1) / scale) / h0
    d12 = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if d12 <= 1e-15 else (0.01 / d12) ** (1 / 5)
    return min(100 * h0, h1)


def _dopri5(
    f: _Counted,
    x: Tensor,
    targets: list[float],
    atol: float,
    rtol: float,
    max_steps: int,
    keep: bool,
    at_grid: bool,
) -> tuple[Tensor, list[Tensor], list[float]]:
    # Stage times are Python floats; _Counted casts them to x's dtype for velocity_fn.
    t = targets[0]
    states, times = ([x], [t]) if keep else ([], [])
    k1 = f(x, t)
    h = _initial_step(f, x, t, targets[-1] - t, k1, atol, rtol)
    attempts = 0
    for t_out in targets[1:]:
        while t < t_out:
            if attempts >= max_steps:
                raise RuntimeError(
                    f"dopri5 exceeded max_steps={max_steps} attempted steps at t={t:.6g}; "
                    "loosen atol/rtol or raise max_steps"
                )
            attempts += 1
            # Land exactly on the output time; absorb a remainder too small to step over.
            if t + h >= t_out or t_out - (t + h) < 1e-12 * max(1.0, abs(t_out)):
                h_step, t_new = t_out - t, t_out
            else:
                h_step, t_new = h, t + h
            if h_step <= 0 or t + h_step == t:
                raise RuntimeError(f"dopri5 step size underflow at t={t:.6g} (h={h_step:.3g})")
            ks = [k1]
            for i in range(1, 6):
                dx = sum(a * k for a, k in zip(_DP_A[i], ks, strict=True) if a != 0.0)
                ks.append(f(x + h_step * dx, t + _DP_C[i] * h_step))
            x_new = x + h_step * sum(b * k for b, k in zip(_DP_B5[:6], ks, strict=True) if b != 0.0)
            k7 = f(x_new, t_new)
            ks.append(k7)
            err = h_step * sum(e * k for e, k in zip(_DP_E, ks, strict=True) if e != 0.0)
            scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
            err_norm = _rms(err / scale)
            if not math.isfinite(err_norm):
                raise RuntimeError(
                    f"dopri5 error estimate is not finite at t={t:.6g}: velocity_fn returned "
                    "inf/nan or the state overflowed"
                )
            accepted = err_norm <= 1.0
            if err_norm == 0.0:
                factor = _MAX_FACTOR
            else:
                factor = min(_MAX_FACTOR, max(_MIN_FACTOR, _SAFETY * err_norm ** (-1 / 5)))
            if accepted:
                t, x, k1 = t_new, x_new, k7  # FSAL: k7 = v(x_new, t_new) is the next k1
                if keep and not at_grid:
                    states.append(x)
                    times.append(t)
            else:
                factor = min(1.0, factor)
            h = h_step * factor
        if keep and at_grid:
            states.append(x)
            times.append(t)
    return x, states, times
