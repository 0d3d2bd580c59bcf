"""A Gaussian data distribution, for which the linear path's marginal flow is known exactly.

With ``x_0 ~ N(0, I)`` and ``x_1 ~ N(mu, sigma^2 I)`` independent, every coordinate of
``x_t = t * x_1 + (1 - t) * x_0`` is Gaussian with

    mean_t = t * mu,    var_t = (1 - t)^2 + t^2 * sigma^2,

and the marginal velocity ``u_t(x) = E[x_1 - x_0 | x_t = x]`` is affine in ``x``:

    u_t(x) = d/dt mean_t + (d/dt var_t) / (2 var_t) * (x - mean_t)
           = mu + (t * sigma^2 - (1 - t)) / var_t * (x - t * mu).

Its flow is ``psi_t(x_0) = t * mu + sqrt(var_t) * x_0``, so ``psi_1(x_0) = mu + sigma * x_0``,
and the CFM target's conditional variance is ``Var[x_1 - x_0 | x_t] = sigma^2 / var_t`` per
coordinate. These give solvers and losses a ground truth to be tested against.

Shapes: ``x`` is (B, ...); ``t`` is (B,), 0-d or a float; ``mu`` and ``sigma`` are floats or
tensors broadcastable to the per-sample shape ``x.shape[1:]``; ``sigma > 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.flow.path import expand_t_like

__all__ = [
    "GaussianVelocity",
    "conditional_velocity_variance_gaussian",
    "flow_map_gaussian",
    "marginal_moments_gaussian",
    "marginal_velocity_gaussian",
]


def _param(value: Tensor | float, x: Tensor, name: str) -> Tensor:
    """``value`` as a tensor in x's dtype/device that broadcasts against one sample of x."""
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    per_sample = x.shape[1:]
    try:
        ok = torch.broadcast_shapes(v.shape, per_sample) == per_sample
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must broadcast to the per-sample shape {tuple(per_sample)} of x; got "
            f"shape {tuple(v.shape)}"
        )
    return v


def _time(t: Tensor | float, x: Tensor) -> Tensor:
    if x.ndim < 1:
        raise ValueError("x needs a batch dimension: expected shape (B, ...)")
    return expand_t_like(torch.as_tensor(t, dtype=x.dtype, device=x.device), x)


def marginal_moments_gaussian(
    t: Tensor | float, mu: Tensor | float, sigma: Tensor | float
) -> tuple[Tensor, Tensor]:
    """Per-coordinate ``(mean_t, var_t) = (t * mu, (1 - t)^2 + t^2 * sigma^2)`` of ``x_t``.

    Plain broadcasting: reshape ``t`` yourself (see :func:`expand_t_like`) for batched inputs.
    """
    t, mu, sigma = (torch.as_tensor(v) for v in (t, mu, sigma))
    return t * mu, (1 - t).square() + t.square() * sigma.square()


def marginal_velocity_gaussian(
    x: Tensor, t: Tensor | float, mu: Tensor | float, sigma: Tensor | float
) -> Tensor:
    """Exact marginal velocity ``u_t(x)`` of the linear path for ``x_1 ~ N(mu, sigma^2 I)``.

    Args:
        x: points, shape (B, ...).
        t: times, shape (B,), 0-d or a float.
        mu: data mean, broadcastable to ``x.shape[1:]``.
        sigma: data std (> 0), broadcastable to ``x.shape[1:]``.

    Returns:
        ``mu + (t sigma^2 - (1 - t)) / var_t * (x - t mu)``, shape (B, ...).
    """
    t_x = _time(t, x)
    mu_x = _param(mu, x, "mu")
    s2 = _param(sigma, x, "sigma").square()
    var_t = (1 - t_x).square() + t_x.square() * s2
    # (d/dt var_t) / 2 = t sigma^2 - (1 - t); var_t >= sigma^2 / (1 + sigma^2) > 0 on [0, 1].
    return mu_x + (t_x * s2 - (1 - t_x)) / var_t * (x - t_x * mu_x)


def flow_map_gaussian(
    x_0: Tensor, t: Tensor | float, mu: Tensor | float, sigma: Tensor | float
) -> Tensor:
    """Exact flow of :func:`marginal_velocity_gaussian`: ``psi_t(x_0) = t mu + sqrt(var_t) x_0``.

    Shapes as in :func:`marginal_velocity_gaussian`; at ``t = 1`` this is ``mu + sigma * x_0``.
    """
    t_x = _time(t, x_0)
    mu_x = _param(mu, x_0, "mu")
    sigma_x = _param(sigma, x_0, "sigma")
    var_t = (1 - t_x).square() + t_x.square() * sigma_x.square()
    return t_x * mu_x + var_t.sqrt() * x_0


def conditional_velocity_variance_gaussian(t: Tensor | float, sigma: Tensor | float) -> Tensor:
    """``Var[x_1 - x_0 | x_t] = sigma^2 / var_t`` per coordinate (independent of ``x_t``, mu).

    This is exactly how much the CFM loss exceeds the marginal FM loss at time ``t``, per
    element, whatever the model. Plain broadcasting between ``t`` and ``sigma``.
    """
    t, sigma = torch.as_tensor(t), torch.as_tensor(sigma)
    s2 = sigma.square()
    return s2 / ((1 - t).square() + t.square() * s2)


class GaussianVelocity(nn.Module):
    """A "model" whose velocity is the exact marginal velocity for ``x_1 ~ N(mu, sigma^2 I)``.

    ``forward(x_t, t, label=None)`` has the signature of a trained velocity network; ``label``
    is accepted and ignored. ``mu`` and ``sigma`` are buffers (float64, cast to the input's
    dtype at call time), so the module moves with ``.to(device)`` and has no parameters.
    """

    mu: Tensor
    sigma: Tensor

    def __init__(self, mu: Tensor | float, sigma: Tensor | float) -> None:
        super().__init__()
        mu_t = torch.as_tensor(mu, dtype=torch.float64)
        sigma_t = torch.as_tensor(sigma, dtype=torch.float64)
        if not torch.isfinite(mu_t).all():
            raise ValueError("mu must be finite")
        if not (torch.isfinite(sigma_t).all() and (sigma_t > 0).all()):
            raise ValueError("sigma must be finite and > 0 (var_1 = sigma^2 must not vanish)")
        self.register_buffer("mu", mu_t.clone())
        self.register_buffer("sigma", sigma_t.clone())

    def forward(self, x_t: Tensor, t: Tensor | float, label: Tensor | None = None) -> Tensor:
        """Return ``u_t(x_t)``, shape (B, ...), for ``x_t`` (B, ...) and ``t`` (B,) or 0-d."""
        del label  # the target is unconditional
        return marginal_velocity_gaussian(x_t, t, self.mu, self.sigma)

    def flow_map(self, x_0: Tensor, t: Tensor | float = 1.0) -> Tensor:
        """Exact solution ``psi_t(x_0)`` of this velocity field, shape (B, ...)."""
        return flow_map_gaussian(x_0, t, self.mu, self.sigma)

    def sample_data(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Draw ``n`` samples of ``x_1 ~ N(mu, sigma^2 I)``, shape (n, *mu/sigma shape)."""
        shape = torch.broadcast_shapes(self.mu.shape, self.sigma.shape)
        dtype = dtype or torch.get_default_dtype()
        # Draw on the generator's device (required by randn), then move next to the buffers.
        device = generator.device if generator is not None else self.mu.device
        z = torch.randn((n, *shape), generator=generator, device=device, dtype=dtype)
        z = z.to(self.mu.device)
        return self.mu.to(dtype) + self.sigma.to(dtype) * z

    def extra_repr(self) -> str:
        return f"mu={self.mu.tolist()}, sigma={self.sigma.tolist()}"
