"""Sample-quality metrics that need no pretrained network."""

from __future__ import annotations

import torch


def sliced_wasserstein2(
    a: torch.Tensor, b: torch.Tensor, num_projections: int = 512, seed: int = 0
) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds.

    SW2(a, b) = sqrt( E_theta[ W2^2(<a, theta>, <b, theta>) ] ) with theta uniform on the
    unit sphere; in 1-D, W2^2 between empirical measures of equal size is the mean squared
    difference of the sorted projections.

    Args:
        a, b: (n, d) samples; flattened beyond the first dim.
        num_projections: random directions, drawn from ``seed``.
    """
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein2 needs equal shapes, got {a.shape} and {b.shape}")
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    proj_a = (a @ theta).sort(dim=0).values
    proj_b = (b @ theta).sort(dim=0).values
    return float(((proj_a - proj_b) ** 2).mean().sqrt())
