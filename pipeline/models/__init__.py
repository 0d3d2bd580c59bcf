"""Velocity networks: construction from config, parameter counting, classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pipeline.models.embeddings import expand_time
from pipeline.models.mlp import MLPVelocity
from pipeline.models.unet import UNet

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

__all__ = [
    "MODEL_KINDS",
    "MLPVelocity",
    "UNet",
    "bare_module",
    "build_model",
    "count_parameters",
    "guided_velocity",
    "to_device_layout",
]


def _mlp(cfg: ModelConfig, shape: tuple[int, ...]) -> nn.Module:
    if len(shape) != 1:
        raise ValueError(
            f"model.kind='mlp' needs flat data_shape (D,), got {shape}; "
            "use model.kind='unet' for images"
        )
    return MLPVelocity(shape[0], cfg.hidden_dim, cfg.depth, cfg.num_classes)


def _unet(cfg: ModelConfig, shape: tuple[int, ...]) -> nn.Module:
    if len(shape) != 3:
        raise ValueError(
            f"model.kind='unet' needs image data_shape (C, H, W), got {shape}; "
            "use model.kind='mlp' for flat data"
        )
    channels, height, width = shape
    if height != width:
        raise ValueError(f"model.kind='unet' needs square images (H == W), got {shape}")
    return UNet(
        in_channels=channels,
        resolution=height,
        base_channels=cfg.base_channels,
        channel_mult=list(cfg.channel_mult),
        num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=list(cfg.attention_resolutions),
        num_heads=cfg.num_heads,
        dropout=cfg.dropout,
        norm_groups=cfg.norm_groups,
        num_classes=cfg.num_classes,
    )


# model.kind -> builder; ``model.kind``'s allowed values are these names (pipeline.config).
_BUILDERS: dict[str, Callable[[ModelConfig, tuple[int, ...]], nn.Module]] = {
    "mlp": _mlp,
    "unet": _unet,
}
MODEL_KINDS: tuple[str, ...] = tuple(_BUILDERS)


def build_model(cfg: ModelConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """Build the velocity network described by ``cfg`` for samples of ``data_shape``.

    Args:
        cfg: the ``model`` config section.
        data_shape: per-sample shape without the batch dim: (D,) for ``kind="mlp"``,
            (C, H, W) with H == W for ``kind="unet"``.
    """
    shape = tuple(int(s) for s in data_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"data_shape must have positive sizes, got {shape}")
    builder = _BUILDERS.get(cfg.kind)
    if builder is None:
        raise ValueError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {cfg.kind!r}")
    return builder(cfg, shape)


def to_device_layout(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device`` in the memory layout its convolutions run fastest in there.

    On the CPU the 4-D weights become channels-last: PyTorch then runs the convolutions and
    the activations between them in NHWC, oneDNN's own layout, with no reorder around each
    convolution (measured on the demo U-Net, one core: 1.14x the forward passes per second
    when sampling, 1.035x the training steps; docs/benchmarks.md). On CUDA the layout is
    left as built (NHWC helped at 64x64 and hurt at 32x32 in eager mode on the H200).
    The values are the same; the last bits of results differ from NCHW's.
    """
    model = model.to(device)
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bare_module(model: nn.Module) -> nn.Module:
    """The bare network inside DDP (``.module``) and/or torch.compile (``._orig_mod``).

    Attributes such as ``num_classes`` and state-dict keys without ``module.`` /
    ``_orig_mod.`` prefixes live there; checkpoints, EMA and guidance all read it.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def guided_velocity(
    model: nn.Module,
    x_t: Tensor,
    t: Tensor | float,
    label: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guided velocity ``v_u + w * (v_c - v_u)``.

    Args:
        model: a velocity network (possibly wrapped by DDP or torch.compile).
        x_t: (B, ...) current state.
        t: (B,) or scalar time.
        label: (B,) int labels, or None (unconditional: a single plain forward).
        guidance_scale: w; 1.0 is the plain conditional model (a single forward),
            0.0 the unconditional one, > 1 extrapolates towards the class.

    Returns:
        (B, ...) velocity, same shape as ``x_t``.

    Conditional and null-class passes run as one forward over a 2B batch (cheaper than two
    small launches, and identical math).
    """
    if label is None or guidance_scale == 1.0:
        return model(x_t, t, label)
    num_classes = getattr(bare_module(model), "num_classes", 0)
    if num_classes <= 0:
        raise ValueError("guided_velocity with a label needs a class-conditional model")
    batch = x_t.shape[0]
    t = expand_time(t, batch, x_t.device)
    null = torch.full_like(label, num_classes)
    v = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([label, null]))
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)
