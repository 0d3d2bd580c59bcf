"""Time (and label) embeddings shared by the velocity networks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Flow-matching time lives in [0, 1]. Standard sinusoidal frequencies were designed for
# integer diffusion steps in [0, 1000], so t is scaled by this factor first: the fastest
# frequency then turns ~1000 radians over the unit interval and the slowest ~0.1, which
# resolves both fine and coarse differences in t.
TIME_SCALE = 1000.0


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Fixed sinusoidal features of a time in [0, 1].

    Args:
        t: (B,) times, any float dtype; computed in float32 for accuracy.
        dim: number of features; an odd ``dim`` gets one zero-padded column.
        max_period: controls the slowest frequency.

    Returns:
        (B, dim) float32 tensor ``[cos(t * f_i), sin(t * f_i)]``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = (t.float() * TIME_SCALE)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t followed by a 2-layer SiLU MLP.

    forward(t (B,)) -> (B, emb_dim)
    """

    def __init__(self, freq_dim: int, emb_dim: int) -> None:
        super().__init__()
        if freq_dim < 1:
            raise ValueError(f"freq_dim must be >= 1, got {freq_dim}")
        if emb_dim < 1:
            raise ValueError(f"emb_dim must be >= 1, got {emb_dim}")
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim))


def expand_time(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Return t as a (B,) float tensor; a scalar (or 0-d/1-element) t is broadcast.

    ODE solvers often step all samples at one shared time, so a scalar is accepted.
    """
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1 and batch != 1):
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) or be a scalar, got {tuple(t.shape)}")
    return t


def check_labels(
    label: Tensor | None, num_classes: int, batch: int, device: torch.device
) -> Tensor:
    """Validate class labels and map ``None`` to the null class.

    Args:
        label: (B,) integer labels in [0, num_classes] (num_classes is the null class), or
            None for "unconditional" (null class everywhere).
        num_classes: number of real classes (> 0).

    Returns:
        (B,) int64 labels on ``device``.

    The range check reads the values back to the host, which would break a compiled graph,
    so under torch.compile it is skipped (an out-of-range index then fails inside the
    embedding lookup instead).
    """
    if label is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if label.dtype in (torch.bool,) or label.is_floating_point() or label.is_complex():
        raise ValueError(f"label must be an integer tensor, got dtype {label.dtype}")
    if label.shape != (batch,):
        raise ValueError(f"label must have shape ({batch},), got {tuple(label.shape)}")
    if not torch.compiler.is_compiling() and label.numel() > 0:
        low, high = int(label.min()), int(label.max())
        for value in (low, high):
            if value < 0 or value > num_classes:
                raise ValueError(
                    f"label value {value} is out of range: expected 0..{num_classes - 1} "
                    f"or {num_classes} (the null class)"
                )
    return label.to(device=device, dtype=torch.long)
