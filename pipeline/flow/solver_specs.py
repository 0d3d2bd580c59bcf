"""The solver table: names, which take ``steps``, NFE per step and order (no torch needed).

:mod:`pipeline.flow.solvers` implements the methods named here and dispatches on them;
configuration (``sample.solver``'s allowed values) and command-line help read the names from
here, so they never copy them and never import torch to list them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_STEP_SOLVERS",
    "SOLVERS",
    "SOLVER_SPECS",
    "SolverSpec",
    "effective_steps",
    "effective_tolerances",
    "is_adaptive",
    "nfe_per_step",
    "solver_spec",
]


@dataclass(frozen=True)
class SolverSpec:
    """What callers need to know about a solver without running it.

    The one place that says which solvers take ``steps``: a fixed-step solver integrates on
    ``steps`` uniform steps and costs exactly ``nfe_per_step * steps`` velocity evaluations;
    an adaptive one ignores ``steps``, chooses its own steps from ``atol``/``rtol`` and
    reports its NFE afterwards (``ODESolution.nfe``). Job identities, sample metadata, MLflow
    params and benchmarks all derive "does steps / do the tolerances matter" from here.

    Attributes:
        name: the ``method`` string of :func:`solve_ode` (and ``sample.solver``).
        adaptive: True when the solver picks its own step sizes (steps ignored).
        nfe_per_step: exact velocity evaluations per step (None for adaptive solvers).
        order: order of the global error (adaptive: of the propagated solution).
    """

    name: str
    adaptive: bool
    nfe_per_step: int | None
    order: int


SOLVER_SPECS: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in (
        SolverSpec("euler", adaptive=False, nfe_per_step=1, order=1),
        SolverSpec("midpoint", adaptive=False, nfe_per_step=2, order=2),
        SolverSpec("heun", adaptive=False, nfe_per_step=2, order=2),
        SolverSpec("rk4", adaptive=False, nfe_per_step=4, order=4),
        SolverSpec("dopri5", adaptive=True, nfe_per_step=None, order=5),
    )
}
SOLVERS: tuple[str, ...] = tuple(SOLVER_SPECS)
"""Every solver name, in the order help texts list them (``sample.solver``'s allowed values)."""
FIXED_STEP_SOLVERS: tuple[str, ...] = tuple(n for n, s in SOLVER_SPECS.items() if not s.adaptive)
ADAPTIVE_SOLVERS: tuple[str, ...] = tuple(n for n, s in SOLVER_SPECS.items() if s.adaptive)


def solver_spec(method: str) -> SolverSpec:
    """The :class:`SolverSpec` of ``method``.

    Raises:
        ValueError: for a name that is not one of :data:`SOLVERS` (the message lists them).
    """
    spec = SOLVER_SPECS.get(method) if isinstance(method, str) else None
    if spec is None:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(SOLVERS)}")
    return spec


def is_adaptive(method: str) -> bool:
    """True when ``method`` chooses its own steps (and ignores ``steps``)."""
    return solver_spec(method).adaptive


def effective_steps(method: str, steps: int | None) -> int | None:
    """The ``steps`` that ``method`` really integrates with: None for an adaptive solver.

    What to pass to :func:`solve_ode` as ``steps`` and what to record in a job identity or
    a sample's metadata: the configured ``sample.steps`` of a dopri5 run changes nothing,
    so it must not make two otherwise equal jobs differ.

    Raises:
        ValueError: an unknown ``method``, or a fixed-step one without ``steps >= 1``.
    """
    if solver_spec(method).adaptive:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"method {method!r} needs steps (an int >= 1); got {steps!r}")
    return steps


def effective_tolerances(method: str, atol: float, rtol: float) -> tuple[float, float] | None:
    """``(atol, rtol)`` when ``method`` uses them (adaptive solvers), else None.

    The counterpart of :func:`effective_steps`: a fixed-step run's tolerances change nothing.
    """
    return (atol, rtol) if solver_spec(method).adaptive else None


def nfe_per_step(method: str) -> int:
    """Velocity evaluations per step of a fixed-step ``method``.

    Raises:
        ValueError: for an adaptive method such as ``"dopri5"`` (read ``ODESolution.nfe``)
            or an unknown name.
    """
    spec = solver_spec(method)
    if spec.nfe_per_step is None:
        raise ValueError(
            f"method {method!r} is adaptive and has no fixed NFE per step; read "
            f"ODESolution.nfe (fixed-step methods: {', '.join(FIXED_STEP_SOLVERS)})"
        )
    return spec.nfe_per_step
