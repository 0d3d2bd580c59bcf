"""Decode one stored image into the model's input: float32 ``(C, H, W)`` in [-1, 1].

Pipeline for one sample (all in Pillow, on the CPU of a Ray Data task)::

    bytes --open (PNG | JPEG | WEBP only)--> PIL image --check mode/size--> convert to L/RGB
          --crop the centred square, resize it to R x R (bicubic, antialiased)--> [flip]
          --> uint8 (H, W, C) --> float32 (C, H, W) = u8 / 127.5 - 1

Only the formats named in :data:`IMAGE_EXTENSIONS` are decoded, and Pillow is told to try
only those formats, so a file that merely *claims* to be a PNG cannot route bytes into one
of Pillow's many other parsers; pickles (``.pt``/``.pkl``) are never deserialised.

Anything that cannot become a clean image raises :class:`BadSample` with a short reason;
the stream (:mod:`pipeline.data.stream`) catches it, skips the sample and counts it.
What counts as *unexpected* (and so bad) rather than merely *different*:

- mode: any of :data:`ACCEPTED_MODES` is converted (``1``, ``L``, ``LA``, ``P``, ``PA``,
  ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, ...). Integer and float modes (``I``, ``I;16``,
  ``F``) are refused: their value range is unknown, and Pillow's conversion to 8 bits clips
  rather than scales, which would silently feed white images to the model.
- size: other sizes are resized, but a side shorter than ``min_side`` (default
  ``max(1, resolution // 4)``), an aspect ratio above ``max_aspect`` (default 4: the centre
  crop would keep under a quarter of the picture) or more than ``max_pixels`` pixels
  (decompression bombs) is refused.

Alpha is composited onto black (digits are white on black) before the channel conversion.
An image already ``R x R`` in the target mode is not resampled, so stored pixels come back
exactly (``u8 / 127.5 - 1``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "ACCEPTED_MODES",
    "IMAGE_EXTENSIONS",
    "BadSample",
    "DecodeSpec",
    "decode_image",
    "to_model_range",
]

# Member extension -> the Pillow format allowed to parse it.
IMAGE_EXTENSIONS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_PIL_FORMATS = tuple(sorted(set(IMAGE_EXTENSIONS.values())))

# Modes we know how to map onto 8-bit L / RGB without guessing a value range.
ACCEPTED_MODES: frozenset[str] = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


class BadSample(ValueError):
    """A sample that cannot be turned into a training image; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeSpec:
    """What every decoded image must become, and what input is refused as unexpected."""

    resolution: int  # output is resolution x resolution
    channels: int  # 1 -> L, 3 -> RGB
    min_side: int = 0  # shorter input side below this is bad; 0: max(1, resolution // 4)
    max_aspect: float = 4.0  # long side / short side above this is bad
    max_pixels: int = 64 * 1024 * 1024  # larger inputs are bad (decompression bombs)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {self.channels!r}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1; got {self.resolution!r}")

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def smallest_side(self) -> int:
        return self.min_side if self.min_side > 0 else max(1, self.resolution // 4)


def _open(data: bytes, ext: str) -> Image.Image:
    fmt = IMAGE_EXTENSIONS.get(ext.lower())
    if fmt is None:
        raise BadSample(f"unsupported image type '.{ext}' (allowed: {sorted(IMAGE_EXTENSIONS)})")
    if not data:
        raise BadSample(f"empty .{ext} member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Try the format the extension names first, then the other allowed ones: a
            # PNG stored as .jpg still decodes, an arbitrary format never does.
            formats = (fmt, *(f for f in _PIL_FORMATS if f != fmt))
            image = Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample(f"image too large: {exc}") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise BadSample(f"undecodable .{ext}: {type(exc).__name__}: {exc}") from None
    return image


def _check(image: Image.Image, spec: DecodeSpec) -> None:
    if image.mode not in ACCEPTED_MODES:
        raise BadSample(f"unexpected image mode '{image.mode}' (accepted: 8-bit L/RGB/P family)")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short < spec.smallest_side:
        raise BadSample(
            f"unexpected image size {width}x{height}: shorter side below {spec.smallest_side}"
        )
    if long > spec.max_aspect * short:
        raise BadSample(
            f"unexpected image size {width}x{height}: aspect ratio above {spec.max_aspect:g}"
        )
    if width * height > spec.max_pixels:
        raise BadSample(f"unexpected image size {width}x{height}: over {spec.max_pixels} pixels")


def _convert(image: Image.Image, mode: str) -> Image.Image:
    if image.mode == mode:
        return image
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    return image.convert(mode)


def decode_image(data: bytes, ext: str, spec: DecodeSpec, flip: bool = False) -> np.ndarray:
    """Decode image bytes into uint8 ``(R, R, C)`` (R = ``spec.resolution``).

    The shorter side is scaled to R and the centred square kept (one bicubic resample of
    the centred square, antialiased when shrinking); ``flip`` mirrors it left-right.

    Raises:
        BadSample: the bytes are not a decodable PNG/JPEG/WEBP, or the mode or size is
            unexpected (see the module docstring).
    """
    image = _open(data, ext)
    res = spec.resolution
    try:
        _check(image, spec)
        if image.format == "JPEG" and min(image.size) >= 2 * res:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below R on either side).
            image.draft(spec.mode, (res, res))
        image.load()
        _check(image, spec)  # draft() may change the mode; the size stays >= R
        image = _convert(image, spec.mode)
        width, height = image.size
        if (width, height) != (res, res):
            side = min(width, height)
            left, top = (width - side) / 2.0, (height - side) / 2.0
            image = image.resize(
                (res, res),
                resample=Image.Resampling.BICUBIC,
                box=(left, top, left + side, top + side),
            )
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8)
    except BadSample:
        raise
    except Exception as exc:  # truncated data, broken chunks: found while loading
        raise BadSample(f"undecodable .{ext}: {type(exc).__name__}: {exc}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape != (res, res, spec.channels):
        raise BadSample(f"decoded to unexpected shape {array.shape}")
    return array


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 ``(..., H, W, C)`` -> float32 ``(..., C, H, W)`` in [-1, 1] (``u8 / 127.5 - 1``)."""
    moved = np.moveaxis(images, -1, -3)
    out = np.ascontiguousarray(moved, dtype=np.float32)  # the one new array; then in place
    out /= np.float32(127.5)
    out -= np.float32(1.0)
    return out
