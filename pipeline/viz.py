"""Images for humans: sample grids and loss curves, as PNG files or PIL images.

Model outputs are float tensors ``(N, C, H, W)`` in ``[-1, 1]`` (the data range of the flow);
images on disk are uint8 ``(N, H, W, C)``. Plots use matplotlib's Agg canvas directly, with
no pyplot global state, so they work in headless Ray workers and threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = ["as_pil", "curves_png", "image_grid", "loss_curve_png", "save_png", "to_uint8"]

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` (or ``(C, H, W)``) floats in ``[-1, 1]`` -> uint8 ``(N, H, W, C)``.

    ``u = round((clamp(x, -1, 1) + 1) * 127.5)``: -1 -> 0, 0 -> 128, 1 -> 255.
    """
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    import torch

    x = x.detach().to("cpu").float()
    u = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def _as_nhwc_uint8(images: Any) -> np.ndarray:
    """Any accepted batch -> uint8 ``(N, H, W, C)``."""
    if _is_tensor(images):
        if images.dtype.is_floating_point:
            return to_uint8(images)
        if str(images.dtype) != "torch.uint8":
            raise ValueError(f"integer tensors must be uint8, got {images.dtype}")
        t = images.detach().to("cpu")
        t = t.unsqueeze(0) if t.ndim == 3 else t
        if t.ndim != 4:
            raise ValueError(f"expected (N, C, H, W), got shape {tuple(t.shape)}")
        return t.permute(0, 2, 3, 1).contiguous().numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"numpy images must be uint8 (N, H, W, C); got {arr.dtype} "
            "(pass float model outputs as a torch tensor (N, C, H, W) in [-1, 1])"
        )
    if arr.ndim == 3:  # (N, H, W) grayscale
        arr = arr[..., None]
    if arr.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) or (N, H, W), got shape {arr.shape}")
    return arr


def _pil_from_hwc(arr: np.ndarray) -> Image.Image:
    channels = arr.shape[2]
    if channels not in _MODES:
        raise ValueError(f"images need 1, 3 or 4 channels, got {channels}")
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=None)


def image_grid(
    images: Any, nrow: int, pad: int = 2, scale: int = 1, pad_value: int = 0
) -> Image.Image:
    """Tile a batch into one image: ``nrow`` images per row, ``pad`` pixels between and around.

    ``images``: uint8 numpy ``(N, H, W, C)`` / ``(N, H, W)``, or a torch tensor
    ``(N, C, H, W)`` (float in ``[-1, 1]``, or uint8). Each image is enlarged ``scale`` times
    (nearest neighbour) first. Image ``i`` has its top-left corner at
    ``(y, x) = (pad + (i // nrow) * (H * scale + pad), pad + (i % nrow) * (W * scale + pad))``;
    the grid is ``cols = min(nrow, N)`` wide and ``ceil(N / cols)`` high. Mode L for 1 channel,
    RGB for 3, RGBA for 4.
    """
    if nrow < 1 or pad < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, pad >= 0, scale >= 1; got {nrow}, {pad}, {scale}")
    arr = _as_nhwc_uint8(images)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((pad + rows * (h + pad), pad + cols * (w + pad), c), pad_value, dtype=np.uint8)
    for i in range(n):
        y = pad + (i // cols) * (h + pad)
        x = pad + (i % cols) * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    return _pil_from_hwc(grid)


def as_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image, uint8 array ``(H, W)``/``(H, W, C)``, or one tensor."""
    if isinstance(image, Image.Image):
        return image
    if _is_tensor(image):
        if image.ndim == 4 and image.shape[0] != 1:
            raise ValueError("as_pil takes one image; use image_grid for a batch")
        return _pil_from_hwc(_as_nhwc_uint8(image)[0])
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 (H, W[, C]), got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected (H, W) or (H, W, C), got shape {arr.shape}")
    return _pil_from_hwc(arr)


def save_png(img: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``img`` (anything :func:`as_pil` takes) as PNG at ``path``; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    as_pil(img).save(out, format="PNG")
    return out


def loss_curve_png(
    steps: Sequence[float],
    values: Sequence[float],
    path: str | os.PathLike[str],
    title: str,
    *,
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool | None = None,
) -> Path:
    """Plot ``values`` against ``steps`` into a PNG at ``path``; returns the path.

    ``logy=None`` uses a log y axis when every value is positive and they span > 10x.
    """
    return curves_png({"": (steps, values)}, path, title, xlabel=xlabel, ylabel=ylabel, logy=logy)


def curves_png(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    title: str,
    *,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool | None = None,
) -> Path:
    """One line per ``{label: (xs, ys)}`` (a legend when labels are given) into a PNG.

    ``logx`` plots x on a log-2 axis (NFE, steps); ``logy`` as in :func:`loss_curve_png`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    every: list[np.ndarray] = []
    for label, (steps, values) in curves.items():
        xs = np.asarray(steps, dtype=float)
        ys = np.asarray(values, dtype=float)
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValueError(
                f"steps and values must be 1-D of one length, got {xs.shape}, {ys.shape}"
            )
        every.append(ys[np.isfinite(ys)])
        ax.plot(xs, ys, linewidth=1.2, marker="o" if label else None, label=label or None)
    finite = np.concatenate(every) if every else np.zeros(0)
    if logy is None:
        logy = bool(finite.size and finite.min() > 0 and finite.max() > 10 * finite.min())
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    if any(curves):
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
