"""Conditional flow matching on the linear path: t = 0 noise, t = 1 data.

``x_t = t * x_1 + (1 - t) * x_0``, target ``dx_t = x_1 - x_0``; sampling integrates
``dx/dt = v(x, t)`` from t = 0 to t = 1.
"""

from pipeline.flow.gaussian import (
    GaussianVelocity,
    conditional_velocity_variance_gaussian,
    flow_map_gaussian,
    marginal_moments_gaussian,
    marginal_velocity_gaussian,
)
from pipeline.flow.loss import cfm_loss, cfm_loss_per_sample
from pipeline.flow.path import CondOTPath, PathSample, expand_t_like
from pipeline.flow.solvers import (
    FIXED_STEP_SOLVERS,
    SOLVERS,
    ODESolution,
    VelocityFn,
    nfe_per_step,
    solve_ode,
)
from pipeline.flow.time_samplers import (
    TIME_SAMPLERS,
    LogitNormalTimeSampler,
    TimeSampler,
    UniformTimeSampler,
    build_time_sampler,
)

__all__ = [
    "FIXED_STEP_SOLVERS",
    "SOLVERS",
    "TIME_SAMPLERS",
    "CondOTPath",
    "GaussianVelocity",
    "LogitNormalTimeSampler",
    "ODESolution",
    "PathSample",
    "TimeSampler",
    "UniformTimeSampler",
    "VelocityFn",
    "build_time_sampler",
    "cfm_loss",
    "cfm_loss_per_sample",
    "conditional_velocity_variance_gaussian",
    "expand_t_like",
    "flow_map_gaussian",
    "marginal_moments_gaussian",
    "marginal_velocity_gaussian",
    "nfe_per_step",
    "solve_ode",
]
