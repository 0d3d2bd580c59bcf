"""Distributions of the training time ``t`` in [0, 1] (t = 0 noise, t = 1 data).

Every sampler draws on the generator's own device and then moves the result, so a seeded CPU
generator gives the same times whatever ``device`` the caller trains on.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "TIME_SAMPLERS",
    "LogitNormalTimeSampler",
    "TimeSampler",
    "UniformTimeSampler",
    "build_time_sampler",
]

TIME_SAMPLERS: tuple[str, ...] = ("uniform", "logit_normal")


@runtime_checkable
class TimeSampler(Protocol):
    """Draws ``n`` training times in [0, 1] as a tensor of shape (n,)."""

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor: ...


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int (number of times); got {n!r}")


def _source_device(
    generator: torch.Generator | None, device: torch.device | str | None
) -> torch.device | str | None:
    # torch.rand/randn require the generator and the output on the same device.
    return generator.device if generator is not None else device


class UniformTimeSampler:
    """``t ~ U[0, 1)``: mean 1/2, variance 1/12."""

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Return ``n`` uniform times, shape (n,), default float dtype, on ``device``."""
        _check_n(n)
        t = torch.rand(n, generator=generator, device=_source_device(generator, device))
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return "UniformTimeSampler()"


class LogitNormalTimeSampler:
    """``t = sigmoid(mean + std * z)``, ``z ~ N(0, 1)``, so ``logit(t) ~ N(mean, std^2)``.

    Concentrates training on intermediate times, where the velocity is hardest to predict
    (Esser et al., 2024); ``mean > 0`` shifts the mass towards data (t = 1).
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not math.isfinite(mean):
            raise ValueError(f"mean must be a finite float; got {mean!r}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a finite float > 0; got {std!r}")
        self.mean = float(mean)
        self.std = float(std)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Return ``n`` logit-normal times, shape (n,), default float dtype, on ``device``."""
        _check_n(n)
        z = torch.randn(n, generator=generator, device=_source_device(generator, device))
        t = torch.sigmoid(self.mean + self.std * z)
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return f"LogitNormalTimeSampler(mean={self.mean}, std={self.std})"


def build_time_sampler(name: str, mean: float = 0.0, std: float = 1.0) -> TimeSampler:
    """Build the sampler called ``name``; ``mean``/``std`` are used by ``"logit_normal"`` only.

    Raises:
        ValueError: if ``name`` is not one of :data:`TIME_SAMPLERS`.
    """
    if name == "uniform":
        return UniformTimeSampler()
    if name == "logit_normal":
        return LogitNormalTimeSampler(mean=mean, std=std)
    allowed = ", ".join(repr(s) for s in TIME_SAMPLERS)
    raise ValueError(f"unknown time sampler {name!r}; allowed: {allowed}")
