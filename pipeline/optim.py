"""Optimiser pieces shared by the training loops: AdamW as fmpipe builds it, and the
learning-rate schedule.

Schedules are functions of images seen (not steps), so a config means the same run at any
worker count or batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

#: Device types whose AdamW runs as one fused kernel over all parameters.
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw(
    params: Iterable[torch.nn.Parameter],
    device: torch.device,
    *,
    lr: float,
    betas: Sequence[float],
    weight_decay: float,
) -> torch.optim.AdamW:
    """AdamW, fused on GPUs and on the CPU.

    The same update as torch's default, in one kernel: on the CPU the default is a Python
    loop of per-tensor ops, 8 ms per step for a 1.7 M-parameter U-Net (239 tensors) against
    3 ms fused, ~2% of a CPU training step.
    """
    fused = True if device.type in FUSED_ADAMW_DEVICES else None
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused
    )


def load_adamw_state(optimizer: torch.optim.AdamW, state: dict) -> None:
    """Load a saved optimizer state, keeping this optimizer's kernel choice.

    ``load_state_dict`` also restores the saved ``fused`` flag, so a state saved by a
    non-fused AdamW (or on another device type) would switch the fused kernel off.
    """
    fused = optimizer.defaults.get("fused")
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"] = fused


def lr_factor(images_seen: int, total_images: int, warmup_images: int, schedule: str) -> float:
    """Multiplier of the base learning rate after ``images_seen`` images.

    Linear warm-up from 0 over ``warmup_images``, then ``constant`` (1.0) or ``cosine``
    (half a cosine from 1 down to 0 at ``total_images``).
    """
    if warmup_images > 0 and images_seen < warmup_images:
        return (images_seen + 1) / warmup_images
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total_images - warmup_images, 1)
        progress = min(max(images_seen - warmup_images, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule '{schedule}'; allowed: constant, cosine")
