"""Optimiser pieces shared by the training loops: the learning-rate schedule.

Schedules are functions of images seen (not steps), so a config means the same run at any
worker count or batch size.
"""

from __future__ import annotations

import math


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
