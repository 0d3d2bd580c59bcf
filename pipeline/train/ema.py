"""Exponential moving average of the weights, with its half-life counted in images.

As in EDM (Karras et al. 2022, NVlabs/edm ``training_loop``): after each optimizer step
that consumed ``n`` images, every EMA parameter moves towards the trained one by

    ema <- beta * ema + (1 - beta) * theta,     beta = 0.5 ** (n / halflife)

so the weight of a past step halves every ``halflife`` images, whatever the batch size or
worker count. Warm-up: early in training the half-life is capped at
``warmup_ratio * images_seen`` (images seen after this step), so the average forgets the
random initialisation quickly: at the first step ``beta`` is about 0 and the EMA is a copy
of the network; the full half-life applies from ``images_seen >= halflife / warmup_ratio``.
``warmup_ratio = 0`` turns the warm-up off. Buffers (none in the U-Net, which uses
GroupNorm) are copied, not averaged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from pipeline.checkpoint import bare_module

__all__ = ["EMA", "ema_beta"]


def ema_beta(
    images_seen: int, images_per_step: int, halflife_images: float, warmup_ratio: float
) -> float:
    """Decay of the step that brought the count to ``images_seen`` (see the module doc)."""
    halflife = float(halflife_images)
    if warmup_ratio > 0:
        halflife = min(halflife, warmup_ratio * images_seen)
    if images_per_step <= 0:
        return 1.0
    return 0.5 ** (images_per_step / max(halflife, 1e-8))


class EMA:
    """An EMA copy of a network, updated in place after each optimizer step.

    ``EMA(model, halflife_images, warmup_ratio)`` copies the bare network (unwrapping DDP /
    torch.compile); :meth:`update` after each step; :attr:`module` is the averaged network,
    always in eval mode with ``requires_grad`` off.
    """

    def __init__(self, model: nn.Module, halflife_images: float, warmup_ratio: float = 0.0) -> None:
        if halflife_images <= 0:
            raise ValueError(f"halflife_images must be > 0, got {halflife_images}")
        if warmup_ratio < 0:
            raise ValueError(f"warmup_ratio must be >= 0, got {warmup_ratio}")
        self.halflife_images = float(halflife_images)
        self.warmup_ratio = float(warmup_ratio)
        self.module = copy.deepcopy(bare_module(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, images_per_step: int) -> float:
        """Average ``model`` in; ``images_seen`` counts this step. Returns the beta used."""
        beta = ema_beta(images_seen, images_per_step, self.halflife_images, self.warmup_ratio)
        src = bare_module(model)
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in src.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update: the model does not have the EMA's parameters")
        # lerp(ema, theta, 1 - beta) = beta * ema + (1 - beta) * theta, for all at once.
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), src.buffers(), strict=True):
            b_ema.copy_(b)
        return beta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(dict(state), strict=True)
