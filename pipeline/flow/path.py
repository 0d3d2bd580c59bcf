"""The linear (CondOT) probability path between noise and data.

Conventions used throughout ``pipeline.flow``: ``t = 0`` is noise, ``t = 1`` is data.

    x_0 ~ N(0, I)                      (noise),       shape (B, ...)
    x_1 ~ q                            (data),        shape (B, ...)
    x_t  = t * x_1 + (1 - t) * x_0     (path sample), shape (B, ...)
    dx_t = d/dt x_t = x_1 - x_0        (conditional target velocity), shape (B, ...)

``t`` has shape ``(B,)``: one time per sample, broadcast over the remaining dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["CondOTPath", "PathSample", "expand_t_like"]


@dataclass(frozen=True)
class PathSample:
    """One batch drawn from the conditional path.

    Attributes:
        x_0: noise, shape (B, ...).
        x_1: data, shape (B, ...).
        t: times, shape (B,).
        x_t: point on the path at ``t``, shape (B, ...).
        dx_t: conditional velocity ``d/dt x_t`` (the regression target), shape (B, ...).
    """

    x_0: Tensor
    x_1: Tensor
    t: Tensor
    x_t: Tensor
    dx_t: Tensor


def expand_t_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times ``t`` (B,) to (B, 1, ..., 1) so they broadcast against ``x``.

    A 0-d ``t`` is returned unchanged (it already broadcasts).

    Raises:
        ValueError: if ``t`` is neither 0-d nor of shape ``(x.shape[0],)``.
    """
    if t.ndim == 0:
        return t
    if x.ndim == 0 or t.shape != (x.shape[0],):
        raise ValueError(
            f"t must have shape (B,) = ({x.shape[0] if x.ndim else '?'},) matching the batch "
            f"dimension of x with shape {tuple(x.shape)}; got t with shape {tuple(t.shape)}"
        )
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class CondOTPath:
    """Linear interpolation path ``x_t = t * x_1 + (1 - t) * x_0`` (alpha_t = t, sigma_t = 1 - t).

    Its conditional velocity ``x_1 - x_0`` does not depend on ``t``, which is what makes the
    CFM regression target cheap and the learned flow close to straight.
    """

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> PathSample:
        """Draw ``x_t`` and its target velocity for paired ``x_0``, ``x_1``.

        Args:
            x_0: noise, shape (B, ...).
            x_1: data, same shape as ``x_0``.
            t: times in [0, 1], shape (B,).

        Returns:
            PathSample with ``x_t = t * x_1 + (1 - t) * x_0`` and ``dx_t = x_1 - x_0``.

        Raises:
            ValueError: on mismatched shapes.
        """
        self._check(x_0, x_1, t)
        t_x = expand_t_like(t, x_1)
        # The two-product form (not x_0 + t * (x_1 - x_0)) hits both endpoints exactly in
        # floating point: x_t == x_0 at t = 0 and x_t == x_1 at t = 1.
        x_t = t_x * x_1 + (1 - t_x) * x_0
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=x_t, dx_t=x_1 - x_0)

    # Conversions between parameterisations of the model output at a point (x_t, t).
    # Useful for models that predict x_1 (data) or x_0 (noise) instead of the velocity.

    def velocity_to_x_1(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Data estimate implied by a velocity: ``x_1 = x_t + (1 - t) * v``. Shapes (B, ...)."""
        return x_t + (1 - expand_t_like(t, x_t)) * velocity

    def velocity_to_x_0(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Noise estimate implied by a velocity: ``x_0 = x_t - t * v``. Shapes (B, ...)."""
        return x_t - expand_t_like(t, x_t) * velocity

    def x_1_to_velocity(self, x_1: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity implied by a data estimate: ``v = (x_1 - x_t) / (1 - t)``; singular at t=1."""
        return (x_1 - x_t) / (1 - expand_t_like(t, x_t))

    def x_0_to_velocity(self, x_0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Velocity implied by a noise estimate: ``v = (x_t - x_0) / t``; singular at t=0."""
        return (x_t - x_0) / expand_t_like(t, x_t)

    @staticmethod
    def _check(x_0: Tensor, x_1: Tensor, t: Tensor) -> None:
        if x_0.shape != x_1.shape:
            raise ValueError(
                f"x_0 and x_1 must have the same shape (B, ...); got x_0 {tuple(x_0.shape)} "
                f"and x_1 {tuple(x_1.shape)}"
            )
        if x_1.ndim < 1:
            raise ValueError("x_0 and x_1 need a batch dimension: expected shape (B, ...)")
        if t.ndim != 1 or t.shape[0] != x_1.shape[0]:
            raise ValueError(
                f"t must have shape (B,) = ({x_1.shape[0]},), one time per sample; got "
                f"{tuple(t.shape)}"
            )
