"""A small MLP velocity field for low-dimensional (toy / tabular) data."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.models.embeddings import TimeEmbedding, check_labels, expand_time


class MLPVelocity(nn.Module):
    """v_theta(x_t, t[, label]) for flat data.

    The time (+ class) embedding is concatenated with x_t at the input, followed by
    ``depth`` hidden SiLU layers of width ``hidden_dim`` and a linear read-out.

    forward(x_t (B, D), t (B,) or scalar, label (B,) int | None) -> (B, D)
    """

    def __init__(self, dim: int, hidden_dim: int, depth: int, num_classes: int = 0) -> None:
        super().__init__()
        for name, value, low in (
            ("dim", dim, 1),
            ("hidden_dim", hidden_dim, 1),
            ("depth", depth, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.dim = dim
        self.num_classes = num_classes
        self.time_embed = TimeEmbedding(freq_dim=hidden_dim, emb_dim=hidden_dim)
        # Only built when conditional, so an unconditional model has no parameter that DDP
        # would see as unused. Index num_classes is the null class used for CFG.
        self.class_embed = nn.Embedding(num_classes + 1, hidden_dim) if num_classes > 0 else None
        layers: list[nn.Module] = [nn.Linear(dim + hidden_dim, hidden_dim), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        layers.append(nn.Linear(hidden_dim, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: Tensor, t: Tensor | float, label: Tensor | None = None) -> Tensor:
        if x_t.ndim != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must have shape (B, {self.dim}), got {tuple(x_t.shape)}")
        batch = x_t.shape[0]
        emb = self.time_embed(expand_time(t, batch, x_t.device))
        if self.class_embed is not None:
            emb = emb + self.class_embed(check_labels(label, self.num_classes, batch, x_t.device))
        elif label is not None:
            raise ValueError("label was given but the model is unconditional (num_classes=0)")
        # Under autocast the embedding comes out bf16 while x_t is fp32: match dtypes going
        # in, and return x_t's dtype (as the U-Net does) so losses are computed in fp32.
        return self.net(torch.cat([x_t, emb.to(x_t.dtype)], dim=-1)).to(x_t.dtype)
