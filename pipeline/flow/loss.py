"""Conditional flow matching (CFM) loss for the linear path.

With ``x_t = t * x_1 + (1 - t) * x_0`` the regression target is ``dx_t = x_1 - x_0`` and

    L_CFM = E_{t, x_0, x_1} || v(x_t, t) - (x_1 - x_0) ||^2,

averaged over the batch and all elements. Its gradient equals (in expectation) that of the
intractable marginal loss ``E || v(x_t, t) - u_t(x_t) ||^2`` with
``u_t(x) = E[x_1 - x_0 | x_t = x]``; the two losses differ only by ``E Var[x_1 - x_0 | x_t]``,
a constant in the model parameters.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["cfm_loss", "cfm_loss_per_sample"]


def _check(velocity: Tensor, x_0: Tensor, x_1: Tensor) -> None:
    if not (velocity.shape == x_0.shape == x_1.shape):
        raise ValueError(
            "velocity, x_0 and x_1 must share one shape (B, ...); got velocity "
            f"{tuple(velocity.shape)}, x_0 {tuple(x_0.shape)}, x_1 {tuple(x_1.shape)}"
        )
    if velocity.ndim < 1:
        raise ValueError("velocity, x_0 and x_1 need a batch dimension: expected (B, ...)")


def cfm_loss_per_sample(velocity: Tensor, x_0: Tensor, x_1: Tensor) -> Tensor:
    """Squared error against ``x_1 - x_0``, averaged over every non-batch element.

    Args:
        velocity: model output ``v(x_t, t)``, shape (B, ...).
        x_0: noise, shape (B, ...).
        x_1: data, shape (B, ...).

    Returns:
        Tensor of shape (B,).
    """
    _check(velocity, x_0, x_1)
    err = (velocity - (x_1 - x_0)).square()
    # flatten, not reshape(B, -1): the latter cannot infer -1 for an empty batch.
    return err.flatten(start_dim=1).mean(dim=1) if err.ndim > 1 else err


def cfm_loss(velocity: Tensor, x_0: Tensor, x_1: Tensor) -> Tensor:
    """Scalar CFM loss: mean over batch and elements of ``(v - (x_1 - x_0))^2``.

    Shapes as in :func:`cfm_loss_per_sample`; equals the mean of its output because every
    sample has the same number of elements.
    """
    _check(velocity, x_0, x_1)
    return (velocity - (x_1 - x_0)).square().mean()
