"""Conditional flow matching on the linear path: t = 0 noise, t = 1 data.

``x_t = t * x_1 + (1 - t) * x_0``, target ``dx_t = x_1 - x_0``; sampling integrates
``dx/dt = v(x, t)`` from t = 0 to t = 1.

The names below load on first use (PEP 562), so that ``pipeline.flow.solver_specs`` (the
solver table that configuration and ``--help`` read) is importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "CondOTPath": "pipeline.flow.path",
    "FIXED_STEP_SOLVERS": "pipeline.flow.solvers",
    "GaussianVelocity": "pipeline.flow.gaussian",
    "LogitNormalTimeSampler": "pipeline.flow.time_samplers",
    "ODESolution": "pipeline.flow.solvers",
    "PathSample": "pipeline.flow.path",
    "SOLVERS": "pipeline.flow.solvers",
    "TIME_SAMPLERS": "pipeline.flow.time_samplers",
    "TimeSampler": "pipeline.flow.time_samplers",
    "UniformTimeSampler": "pipeline.flow.time_samplers",
    "VelocityFn": "pipeline.flow.solvers",
    "build_time_sampler": "pipeline.flow.time_samplers",
    "cfm_loss": "pipeline.flow.loss",
    "cfm_loss_per_sample": "pipeline.flow.loss",
    "conditional_velocity_variance_gaussian": "pipeline.flow.gaussian",
    "expand_t_like": "pipeline.flow.path",
    "flow_map_gaussian": "pipeline.flow.gaussian",
    "marginal_moments_gaussian": "pipeline.flow.gaussian",
    "marginal_velocity_gaussian": "pipeline.flow.gaussian",
    "nfe_per_step": "pipeline.flow.solvers",
    "solve_ode": "pipeline.flow.solvers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.flow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
