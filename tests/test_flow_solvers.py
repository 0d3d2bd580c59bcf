"""ODE solvers: convergence orders, dopri5 tolerance control, exact NFE, trajectories, errors,
and sampling an exactly known flow (Gaussian target)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from pipeline.flow import (
    FIXED_STEP_SOLVERS,
    SOLVERS,
    GaussianVelocity,
    nfe_per_step,
    solve_ode,
)

F64 = torch.float64

# Two test problems on [0, 1] with closed-form solutions.
#  * scalar, time-dependent: dx/dt = -2 t x  ->  x(t1) = x(t0) exp(-(t1^2 - t0^2))
#    (catches solvers that evaluate v at the wrong stage times);
#  * linear system dx/dt = A x  ->  x(1) = expm(A) x(0), a damped rotation.
A = torch.tensor([[-0.1, 3.0], [-3.0, -0.1]], dtype=F64)


def v_scalar(x: Tensor, t: Tensor) -> Tensor:
    return -2.0 * t.reshape(-1, *([1] * (x.ndim - 1))) * x


def v_linear(x: Tensor, t: Tensor) -> Tensor:
    return x @ A.T


def exact_scalar(x_0: Tensor, t0: float = 0.0, t1: float = 1.0) -> Tensor:
    return x_0 * math.exp(-(t1**2 - t0**2))


def exact_linear(x_0: Tensor) -> Tensor:
    return x_0 @ torch.linalg.matrix_exp(A).T


PROBLEMS = {"scalar": (v_scalar, exact_scalar), "linear": (v_linear, exact_linear)}


def x0_batch(shape: tuple[int, ...] = (6, 2), seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


class Counter:
    """velocity_fn wrapper that counts calls and records the times it was given."""

    def __init__(self, fn):
        self.fn, self.calls, self.times = fn, 0, []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        self.times.append(t.clone())
        return self.fn(x, t)


# ---------------------------------------------------------------- orders of convergence

ORDERS = {"euler": 1.0, "midpoint": 2.0, "heun": 2.0, "rk4": 4.0}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("method", FIXED_STEP_SOLVERS)
def test_fixed_step_global_error_order(method: str, problem: str) -> None:
    fn, exact = PROBLEMS[problem]
    x_0 = x0_batch()
    # Steps large enough for the asymptotic regime, small enough that rk4 stays far above
    # float64 round-off (its error at 64 steps is ~1e-7 here).
    steps = np.array([8, 16, 32, 64])
    errs = []
    for n in steps:
        x_1 = solve_ode(fn, x_0, method, steps=int(n)).x_1
        errs.append((x_1 - exact(x_0)).abs().max().item())
    slope = np.polyfit(np.log(1.0 / steps), np.log(errs), 1)[0]
    assert abs(slope - ORDERS[method]) < 0.3, (method, problem, slope, errs)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_dopri5_meets_tolerance_and_tightens(problem: str) -> None:
    fn, exact = PROBLEMS[problem]
    x_0 = x0_batch()
    x_true = exact(x_0)
    errs, nfes = [], []
    for tol in (1e-4, 1e-6, 1e-8):
        sol = solve_ode(fn, x_0, "dopri5", atol=tol, rtol=tol)
        err = (sol.x_1 - x_true).abs().max().item()
        # The controller bounds the local error per step; over [0, 1] the global error of
        # these non-stiff problems stays within a small multiple of the tolerance.
        assert err < 10 * (tol + tol * x_true.abs().max().item()), (tol, err)
        errs.append(err)
        nfes.append(sol.nfe)
    assert errs[0] > errs[1] > errs[2]
    assert nfes[0] < nfes[1] < nfes[2]


def test_dopri5_on_time_grid_hits_grid_points() -> None:
    x_0 = x0_batch()
    grid = torch.tensor([0.0, 0.1, 0.35, 0.5, 0.9, 1.0], dtype=F64)
    sol = solve_ode(
        v_scalar, x_0, "dopri5", time_grid=grid, atol=1e-9, rtol=1e-9, return_trajectory=True
    )
    assert sol.trajectory is not None and sol.times is not None
    assert sol.trajectory.shape == (len(grid), *x_0.shape)
    torch.testing.assert_close(sol.times, grid)
    for k, t in enumerate(grid.tolist()):
        torch.testing.assert_close(sol.trajectory[k], exact_scalar(x_0, 0.0, t), rtol=0, atol=1e-7)


def test_dopri5_trajectory_without_grid_is_accepted_steps() -> None:
    x_0 = x0_batch()
    sol = solve_ode(v_linear, x_0, "dopri5", return_trajectory=True)
    assert sol.trajectory is not None and sol.times is not None
    assert sol.trajectory.shape[0] == sol.times.shape[0] >= 3
    assert sol.times[0] == 0 and sol.times[-1] == 1
    assert (sol.times[1:] > sol.times[:-1]).all()
    torch.testing.assert_close(sol.trajectory[0], x_0)
    torch.testing.assert_close(sol.trajectory[-1], sol.x_1)


# ---------------------------------------------------------------- NFE, times, trajectories


@pytest.mark.parametrize("method", FIXED_STEP_SOLVERS)
def test_fixed_step_nfe_is_exact(method: str) -> None:
    x_0 = x0_batch()
    for steps in (1, 3, 10):
        fn = Counter(v_linear)
        sol = solve_ode(fn, x_0, method, steps=steps)
        assert fn.calls == sol.nfe == steps * nfe_per_step(method)


def test_dopri5_nfe_is_exact() -> None:
    x_0 = x0_batch()
    fn = Counter(v_linear)
    sol = solve_ode(fn, x_0, "dopri5", atol=1e-7, rtol=1e-7)
    assert fn.calls == sol.nfe
    # 1 initial evaluation + 1 for the starting step size + 6 per attempted step (FSAL reuses
    # the 7th stage of an accepted step as the next first stage).
    assert (sol.nfe - 2) % 6 == 0 and sol.nfe > 2


def test_nfe_per_step_and_names() -> None:
    assert SOLVERS == ("euler", "midpoint", "heun", "rk4", "dopri5")
    assert FIXED_STEP_SOLVERS == ("euler", "midpoint", "heun", "rk4")
    assert [nfe_per_step(m) for m in FIXED_STEP_SOLVERS] == [1, 2, 2, 4]
    with pytest.raises(ValueError, match="adaptive"):
        nfe_per_step("dopri5")
    with pytest.raises(ValueError, match="euler"):
        nfe_per_step("rk45")


@pytest.mark.parametrize("method", SOLVERS)
def test_velocity_fn_gets_batched_t_in_x_dtype(method: str) -> None:
    x_0 = x0_batch((5, 3), dtype=torch.float32)
    fn = Counter(lambda x, t: -x)
    sol = solve_ode(fn, x_0, method, steps=None if method == "dopri5" else 4)
    assert sol.x_1.dtype == torch.float32 and sol.x_1.shape == x_0.shape
    for t in fn.times:
        assert t.shape == (5,) and t.dtype == torch.float32 and t.device == x_0.device
        assert (t == t[0]).all() and 0 <= t[0].item() <= 1


def test_stage_times_of_fixed_step_methods() -> None:
    x_0 = x0_batch()
    expected = {
        "euler": [0.0, 0.5],
        "midpoint": [0.0, 0.25, 0.5, 0.75],
        "heun": [0.0, 0.5, 0.5, 1.0],
        "rk4": [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0],
    }
    for method, times in expected.items():
        fn = Counter(v_linear)
        solve_ode(fn, x_0, method, steps=2)
        assert [t[0].item() for t in fn.times] == times, method


@pytest.mark.parametrize("method", FIXED_STEP_SOLVERS)
def test_trajectory_shape_and_endpoints(method: str) -> None:
    x_0 = x0_batch((3, 2, 4, 4))  # image-like (B, C, H, W)
    sol = solve_ode(lambda x, t: -x, x_0, method, steps=5, return_trajectory=True)
    assert sol.trajectory is not None and sol.times is not None
    assert sol.trajectory.shape == (6, 3, 2, 4, 4)
    torch.testing.assert_close(sol.times, torch.linspace(0, 1, 6, dtype=F64))
    assert torch.equal(sol.trajectory[0], x_0)
    assert torch.equal(sol.trajectory[-1], sol.x_1)
    plain = solve_ode(lambda x, t: -x, x_0, method, steps=5)
    assert plain.trajectory is None and plain.times is None
    assert torch.equal(plain.x_1, sol.x_1)


def test_time_grid_nonuniform_euler_matches_manual_recursion() -> None:
    x_0 = x0_batch()
    grid = torch.tensor([0.0, 0.05, 0.2, 0.6, 1.0], dtype=F64)
    x = x_0
    for t, t_next in itertools.pairwise(grid):
        x = x + (t_next - t) * v_scalar(x, t.expand(x.shape[0]))
    sol = solve_ode(v_scalar, x_0, "euler", time_grid=grid, return_trajectory=True)
    torch.testing.assert_close(sol.x_1, x)
    assert sol.nfe == 4 and sol.trajectory is not None and sol.trajectory.shape[0] == 5
    torch.testing.assert_close(sol.times, grid)


def test_time_grid_uniform_equals_steps_and_subinterval_is_respected() -> None:
    x_0 = x0_batch()
    by_steps = solve_ode(v_scalar, x_0, "rk4", steps=8).x_1
    by_grid = solve_ode(v_scalar, x_0, "rk4", time_grid=torch.linspace(0, 1, 9)).x_1
    torch.testing.assert_close(by_grid, by_steps)
    sub = solve_ode(v_scalar, x_0, "rk4", time_grid=torch.linspace(0.2, 0.7, 21, dtype=F64)).x_1
    torch.testing.assert_close(sub, exact_scalar(x_0, 0.2, 0.7), rtol=0, atol=1e-8)


def test_agrees_with_torchdiffeq() -> None:
    """Cross-check against an independent implementation (dev dependency)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    x_0 = x0_batch()
    grid = torch.linspace(0, 1, 11, dtype=F64)

    def fn(t: Tensor, x: Tensor) -> Tensor:  # torchdiffeq's argument order, scalar t
        return v_scalar(x, t.expand(x.shape[0]))

    # torchdiffeq's euler and midpoint are the same one-step formulas on a fixed grid.
    for method in ("euler", "midpoint"):
        ref = torchdiffeq.odeint(fn, x_0, grid, method=method)
        sol = solve_ode(v_scalar, x_0, method, time_grid=grid, return_trajectory=True)
        torch.testing.assert_close(sol.trajectory, ref, rtol=1e-12, atol=1e-12)
    ref = torchdiffeq.odeint(fn, x_0, grid, method="dopri5", rtol=1e-10, atol=1e-10)
    sol = solve_ode(
        v_scalar, x_0, "dopri5", time_grid=grid, rtol=1e-10, atol=1e-10, return_trajectory=True
    )
    torch.testing.assert_close(sol.trajectory, ref, rtol=0, atol=1e-8)


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("method", SOLVERS)
def test_gradients_flow_through_solver(method: str) -> None:
    # dx/dt = a x  ->  x_1 = e^a x_0, so d(sum x_1)/d x_0 = e^a elementwise.
    a = -0.7
    x_0 = x0_batch((4, 3)).requires_grad_(True)
    steps = None if method == "dopri5" else 200
    sol = solve_ode(lambda x, t: a * x, x_0, method, steps=steps, atol=1e-8, rtol=1e-8)
    assert sol.x_1.requires_grad
    (grad,) = torch.autograd.grad(sol.x_1.sum(), x_0)
    # Relative error of e^a at h = 1/200: ~ a^2 h / 2 (euler), ~ |a|^3 h^2 / 6 (2nd order).
    tol = {"euler": 5e-3, "midpoint": 1e-5, "heun": 1e-5, "rk4": 1e-8, "dopri5": 1e-6}[method]
    torch.testing.assert_close(grad, torch.full_like(grad, math.exp(a)), rtol=tol, atol=0)
    with torch.no_grad():
        assert not solve_ode(lambda x, t: a * x, x_0, method, steps=steps).x_1.requires_grad


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "rk45", "steps": 4}, "method must be one of"),
        ({"method": "euler"}, "needs steps"),
        ({"method": "euler", "steps": 0}, "steps must be an int >= 1"),
        ({"method": "euler", "steps": 2.0}, "steps must be an int >= 1"),
        ({"method": "rk4", "steps": 4, "time_grid": torch.linspace(0, 1, 5)}, "not both"),
        ({"method": "dopri5", "steps": 4}, "dopri5 chooses its own steps"),
        ({"method": "euler", "time_grid": torch.tensor([0.0, 0.5, 0.4, 1.0])}, "increasing"),
        ({"method": "heun", "time_grid": torch.tensor([0.0, 0.0, 1.0])}, "increasing"),
        ({"method": "dopri5", "time_grid": torch.tensor([1.0, 0.0])}, "increasing"),
        ({"method": "euler", "time_grid": torch.tensor([0.0])}, "at least 2"),
        ({"method": "euler", "time_grid": torch.zeros(2, 2)}, "1-D"),
        ({"method": "dopri5", "atol": 0.0, "rtol": 0.0}, "atol and rtol"),
        ({"method": "dopri5", "max_steps": 0}, "max_steps"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve_ode(v_linear, x0_batch(), **kwargs)


def test_bad_x_0_and_velocity_shape_raise() -> None:
    with pytest.raises(ValueError, match="batch dimension"):
        solve_ode(v_linear, torch.tensor(1.0, dtype=F64), "euler", steps=2)
    with pytest.raises(ValueError, match="floating dtype"):
        solve_ode(v_linear, torch.ones(2, 2, dtype=torch.int64), "euler", steps=2)
    with pytest.raises(ValueError, match="shape of x"):
        solve_ode(lambda x, t: x[:, :1], x0_batch(), "euler", steps=2)


def test_dopri5_raises_when_max_steps_exceeded() -> None:
    # A fast oscillation needs many steps at tight tolerance.
    def fast(x: Tensor, t: Tensor) -> Tensor:
        return 200.0 * torch.stack([x[:, 1], -x[:, 0]], dim=1)

    with pytest.raises(RuntimeError, match="max_steps=5"):
        solve_ode(fast, x0_batch(), "dopri5", atol=1e-8, rtol=1e-8, max_steps=5)
    # ... and succeeds with room to work.
    assert solve_ode(fast, x0_batch(), "dopri5", atol=1e-6, rtol=1e-6).nfe > 5 * 6


def test_dopri5_raises_on_non_finite_velocity() -> None:
    with pytest.raises(RuntimeError, match="not finite"):
        solve_ode(lambda x, t: x * float("nan"), x0_batch(), "dopri5")


# ---------------------------------------------------------------- exact Gaussian flow

N_GAUSS = 40_000
MU = [2.0, -1.0, 0.5, 1.5]
SIGMA = 0.5
# Discretisation allowance on the per-sample RMS error vs the exact flow map
# psi_1(x_0) = mu + sigma x_0: Euler is first order (error ~ C / steps with C ~ 1 here),
# the 2nd/4th-order methods at 20 steps and dopri5 at tol 1e-5 are far below 1e-3.
GAUSS_CASES = [
    ("euler", 200, 1e-2),
    ("midpoint", 20, 1e-3),
    ("heun", 20, 3e-3),
    ("rk4", 20, 1e-5),
    ("dopri5", None, 1e-3),
]


@pytest.fixture
def one_thread():
    # ~1000 cheap elementwise ops on 40k elements: intra-op thread hand-offs cost more than
    # they save, and on a busy 2-core machine they dominate the run time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gaussian_x0() -> Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(N_GAUSS, len(MU), generator=g, dtype=F64)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("method", "steps", "disc_tol"), GAUSS_CASES)
def test_sampling_exact_gaussian_flow(
    gaussian_x0: Tensor, method: str, steps: int | None, disc_tol: float
) -> None:
    model = GaussianVelocity(torch.tensor(MU, dtype=F64), SIGMA)
    with torch.no_grad():
        x_1 = solve_ode(model, gaussian_x0, method, steps=steps).x_1
    # Pathwise: each sample lands on its image under the exact flow map.
    rms = (x_1 - model.flow_map(gaussian_x0)).square().mean().sqrt().item()
    assert rms < disc_tol, rms
    # Distributional: Monte-Carlo standard error of the sample mean is sigma / sqrt(N) and of
    # the sample std about sigma / sqrt(2N); allow 5 standard errors plus the discretisation
    # allowance (a per-sample error of RMS e shifts mean and std by at most e).
    mean_tol = 5 * SIGMA / math.sqrt(N_GAUSS) + disc_tol
    std_tol = 5 * SIGMA / math.sqrt(2 * N_GAUSS) + disc_tol
    mu = torch.tensor(MU, dtype=F64)
    assert (x_1.mean(0) - mu).abs().max().item() < mean_tol
    assert (x_1.std(0) - SIGMA).abs().max().item() < std_tol


# ---------------------------------------------------------------- the solver step rule


def test_solver_specs_are_the_one_step_rule() -> None:
    from pipeline.flow.solvers import (
        ADAPTIVE_SOLVERS,
        SOLVER_SPECS,
        effective_steps,
        effective_tolerances,
        is_adaptive,
        solver_spec,
    )

    assert tuple(SOLVER_SPECS) == SOLVERS
    assert ADAPTIVE_SOLVERS == ("dopri5",)
    assert set(FIXED_STEP_SOLVERS) | set(ADAPTIVE_SOLVERS) == set(SOLVERS)
    for name in FIXED_STEP_SOLVERS:
        spec = solver_spec(name)
        assert not spec.adaptive and spec.nfe_per_step == nfe_per_step(name)
        assert not is_adaptive(name)
        assert effective_steps(name, 7) == 7
        assert effective_tolerances(name, 1e-3, 1e-4) is None
    assert is_adaptive("dopri5") and solver_spec("dopri5").nfe_per_step is None
    assert effective_steps("dopri5", 7) is None and effective_steps("dopri5", None) is None
    assert effective_tolerances("dopri5", 1e-3, 1e-4) == (1e-3, 1e-4)
    assert [solver_spec(m).order for m in SOLVERS] == [1, 2, 2, 4, 5]
    with pytest.raises(ValueError, match="unknown method 'rk45'; allowed: euler, midpoint"):
        is_adaptive("rk45")
    with pytest.raises(ValueError, match="'heun' needs steps"):
        effective_steps("heun", None)
    with pytest.raises(ValueError, match="'euler' needs steps"):
        effective_steps("euler", 0)


@pytest.mark.parametrize("method", SOLVERS)
def test_effective_steps_is_what_solve_ode_accepts(method: str) -> None:
    """The rule and the solver agree: passing effective_steps() never trips solve_ode."""
    from pipeline.flow.solvers import effective_steps, solver_spec

    sol = solve_ode(v_linear, x0_batch(), method, steps=effective_steps(method, 4))
    spec = solver_spec(method)
    if not spec.adaptive:
        assert sol.nfe == 4 * spec.nfe_per_step
