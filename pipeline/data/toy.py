"""Built-in 2-D distributions for the toy example: N(0, I), 8 Gaussians, two moons.

Every sampler takes an explicit ``torch.Generator`` so that draws derive from the seed.
Returned tensors have shape (n, 2), float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Sampler2D = Callable[[int, torch.Generator], torch.Tensor]


def standard_normal(n: int, generator: torch.Generator) -> torch.Tensor:
    """x ~ N(0, I_2), shape (n, 2)."""
    return torch.randn(n, 2, generator=generator)


def eight_gaussians(n: int, generator: torch.Generator, radius: float = 4.0) -> torch.Tensor:
    """Mixture of 8 isotropic Gaussians (std 0.5) evenly spaced on a circle."""
    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    which = torch.randint(0, 8, (n,), generator=generator)
    return centres[which] + 0.5 * torch.randn(n, 2, generator=generator)


def two_moons(n: int, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """Two interleaving half circles (sklearn's make_moons layout), centred, scaled by 2."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, angle.cos(), 1.0 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.0
    return points + noise * torch.randn(n, 2, generator=generator)


TOY_DISTRIBUTIONS: dict[str, Sampler2D] = {
    "normal": standard_normal,
    "8gaussians": eight_gaussians,
    "moons": two_moons,
}


def toy_sampler(name: str) -> Sampler2D:
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(
            f"unknown 2-D distribution '{name}'; choose one of {list(TOY_DISTRIBUTIONS)}"
        )
    return TOY_DISTRIBUTIONS[name]
