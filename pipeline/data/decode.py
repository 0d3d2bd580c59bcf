"""Decode one stored image into the model's input: float32 ``(C, H, W)`` in [-1, 1].

Pipeline for one sample (all in Pillow, on the CPU of a Ray Data task)::

    bytes --open (only the formats of IMAGE_EXTENSIONS)--> lazy PIL image (header only)
          --check mode, pixel count (decompression bombs)--> [JPEG draft] --> load frame 0
          --EXIF orientation--> 16/32-bit and float to 8 bit --> alpha onto the background
          --> L/RGB --size by data.resize (R x R, bicubic, antialiased)--> [flip]
          --> uint8 (H, W, C) --> float32 (C, H, W) = u8 / 127.5 - 1

Formats. Shards written by other tools (webdataset's ShardWriter, img2dataset, Hugging Face
exports) are read as they come: ``png``, ``jpg``/``jpeg``, ``webp``, ``ppm``/``pgm``/``pbm``/
``pnm``, ``bmp``, ``tiff``/``tif`` and ``gif`` (see :data:`IMAGE_EXTENSIONS`; a sample holding
several images uses the first extension in that order). Pillow is told to try only those
formats (the one the extension names first, so a PNG stored as ``.jpg`` still decodes), so a
file that merely *claims* to be an image cannot route bytes into one of Pillow's many other
parsers; pickles (``.pt``/``.pkl``) are never deserialised. Animated or multi-page files
(GIF, TIFF, APNG, WEBP) give their first frame.

Anything that cannot become a clean image raises :class:`BadSample` with a short reason;
the stream (:mod:`pipeline.data.stream`) catches it, skips the sample and counts it.
The rules, each a fixed function of the file alone (so a crop, a retry or another worker
sees the same pixels):

- mode: every mode of :data:`ACCEPTED_MODES` is converted; others are bad. 8-bit modes
  (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, ...) by Pillow.
  Wider modes by a fixed scale, never the image's own min/max, and never Pillow's 8-bit
  conversion (it clips, which turns most 16-bit pictures white):
  ``I;16``/``I;16B``/``I;16L``/``I;16N``: ``u8 = round(v / 257)`` (0..65535 onto 0..255,
  ``257 * k -> k`` exactly); ``I`` (32-bit): clipped to 0..65535, then the same;
  ``F``: clipped to 0..1, ``u8 = round(255 * v)``, NaN as 0.
- orientation: an EXIF ``Orientation`` tag is applied (``ImageOps.exif_transpose``) before
  sizing, so a phone photo stored sideways is trained upright.
- alpha (``LA``, ``PA``, ``RGBA``, a ``tRNS``/GIF transparent colour): composited onto
  ``data.alpha_background``, black by default (digits are white on black) or white.
- size (``data.resize``): ``center_crop`` (default) scales the shorter side to R and keeps
  the centred square; ``random_crop`` does the same at an offset along the longer side of
  ``crop_at`` in [0, 1] (0: left/top, 1: right/bottom; the stream draws it per sample from
  ``(seed, epoch, key)``); ``pad`` scales the longer side to R and letterboxes the whole
  picture, centred, on the background colour. No aspect ratio or small side is a reason to
  drop a sample (a 1 x 1000 image is used).
- decompression bombs: more than ``data.max_pixels`` pixels (width x height of the header,
  read before any pixel data is decoded, so the memory is never allocated) is bad; Pillow's
  own ``MAX_IMAGE_PIXELS`` error (twice Pillow's limit, above the largest allowed
  ``data.max_pixels``) is reported the same way and its warning is left to our limit.

An image already ``R x R`` in the target mode (and without transparency) is not resampled,
so stored pixels come back exactly (``u8 / 127.5 - 1``). A JPEG at least ``2R`` on its
shorter side is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (``draft``), never below R.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ACCEPTED_MODES",
    "BACKGROUNDS",
    "IMAGE_EXTENSIONS",
    "RESIZE_POLICIES",
    "BadSample",
    "DecodeSpec",
    "decode_image",
    "to_model_range",
]

# Member extension -> the Pillow format allowed to parse it. The order is the preference
# when one sample holds several images (pipeline.data.stream).
IMAGE_EXTENSIONS: dict[str, str] = {
    "png": "PNG",
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "webp": "WEBP",
    "ppm": "PPM",  # Pillow's PPM plugin reads the whole netpbm family (P1-P6)
    "pgm": "PPM",
    "pbm": "PPM",
    "pnm": "PPM",
    "bmp": "BMP",
    "tiff": "TIFF",
    "tif": "TIFF",
    "gif": "GIF",
}
_PIL_FORMATS = tuple(dict.fromkeys(IMAGE_EXTENSIONS.values()))

_WIDE_16 = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})  # round(v / 257)
_WIDE_MODES = _WIDE_16 | {"I", "F"}  # I: clip 0..65535, then as I;16; F: clip 0..1, * 255
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa"})
# Modes we know how to map onto 8-bit L / RGB by a fixed rule (module docstring).
ACCEPTED_MODES: frozenset[str] = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV"} | _WIDE_MODES
)

RESIZE_POLICIES = ("center_crop", "random_crop", "pad")  # data.resize
BACKGROUNDS: dict[str, int] = {"black": 0, "white": 255}  # data.alpha_background -> grey level
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# Pillow raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS (~179M) inside open();
# data.max_pixels stays below that, so Pillow never refuses what our limit allows.
MAX_PIXELS_CEILING = 128 * 1024 * 1024
_PIL_BOMB_RE = re.compile(r"\((\d+) pixels\)")


class BadSample(ValueError):
    """A sample that cannot be turned into a training image; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodeSpec:
    """What every decoded image must become, how it is sized, and what input is refused."""

    resolution: int  # output is resolution x resolution
    channels: int  # 1 -> L, 3 -> RGB
    resize: str = "center_crop"  # one of RESIZE_POLICIES
    background: str = "black"  # alpha and pad fill: one of BACKGROUNDS
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger inputs are bad (decompression bombs)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {self.channels!r}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1; got {self.resolution!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}; got {self.resize!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"background must be one of {tuple(BACKGROUNDS)}; got {self.background!r}"
            )
        if not 1 <= self.max_pixels <= MAX_PIXELS_CEILING:
            raise ValueError(
                f"max_pixels must be in [1, {MAX_PIXELS_CEILING}]; got {self.max_pixels!r}"
            )

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def fill(self) -> int | tuple[int, int, int]:
        """The background colour in the target mode."""
        level = BACKGROUNDS[self.background]
        return level if self.channels == 1 else (level, level, level)


def _bomb(pixels: int, size: str, spec: DecodeSpec) -> BadSample:
    return BadSample(
        f"decompression bomb: {size}{pixels:,} pixels, over the limit of "
        f"{spec.max_pixels:,} (data.max_pixels)"
    )


def _open(data: bytes, ext: str, spec: DecodeSpec) -> Image.Image:
    fmt = IMAGE_EXTENSIONS.get(ext.lower())
    if fmt is None:
        raise BadSample(f"unsupported image type '.{ext}' (allowed: {sorted(IMAGE_EXTENSIONS)})")
    if not data:
        raise BadSample(f"empty .{ext} member")
    try:
        with warnings.catch_warnings():
            # Our own limit (checked on the header right after this) decides; Pillow's
            # warning threshold may lie below a configured data.max_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Try the format the extension names first, then the other allowed ones: a
            # PNG stored as .jpg still decodes, an arbitrary format never does.
            formats = (fmt, *(f for f in _PIL_FORMATS if f != fmt))
            image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:
        found = _PIL_BOMB_RE.search(str(exc))
        raise _bomb(int(found.group(1)) if found else 0, "", spec) from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise BadSample(f"undecodable .{ext}: {type(exc).__name__}: {exc}") from None
    return image


def _check(image: Image.Image, spec: DecodeSpec) -> None:
    """Refuse from the header alone: nothing here decodes pixel data."""
    width, height = image.size
    if width * height > spec.max_pixels:
        raise _bomb(width * height, f"{width}x{height} = ", spec)
    if image.mode not in ACCEPTED_MODES:
        raise BadSample(
            f"unexpected image mode '{image.mode}' (accepted: {sorted(ACCEPTED_MODES)})"
        )


def _to_8bit(image: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` / ``F`` -> ``L`` by the fixed rules of the module docstring."""
    array = np.asarray(image)
    if image.mode == "F":
        unit = np.clip(np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
        u8 = np.rint(unit * 255.0)
    else:
        v = np.clip(array.astype(np.int64), 0, 65535)  # I;16*: already in range; I: clipped
        u8 = (2 * v + 257) // 514  # round(v / 257), no ties (257 is odd)
    return Image.fromarray(np.ascontiguousarray(u8, dtype=np.uint8))


def _convert(image: Image.Image, spec: DecodeSpec) -> Image.Image:
    mode = spec.mode
    transparent = image.mode in _ALPHA_MODES or "transparency" in image.info
    if image.mode == mode and not transparent:
        return image
    if transparent:
        rgba = image.convert("RGBA")
        level = BACKGROUNDS[spec.background]
        base = Image.new("RGBA", rgba.size, (level, level, level, 255))
        image = Image.alpha_composite(base, rgba)
    return image.convert(mode)


def _size(image: Image.Image, spec: DecodeSpec, crop_at: float | None) -> Image.Image:
    res = spec.resolution
    width, height = image.size
    if (width, height) == (res, res):
        return image
    if spec.resize == "pad":
        scale = res / max(width, height)
        inner = (max(1, min(res, round(width * scale))), max(1, min(res, round(height * scale))))
        if inner != (width, height):
            image = image.resize(inner, resample=Image.Resampling.BICUBIC)
        canvas = Image.new(spec.mode, (res, res), spec.fill)
        canvas.paste(image, ((res - inner[0]) // 2, (res - inner[1]) // 2))
        return canvas
    at = crop_at if spec.resize == "random_crop" and crop_at is not None else 0.5
    side = min(width, height)
    left, top = (width - side) * at, (height - side) * at
    return image.resize(
        (res, res), resample=Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )


def decode_image(
    data: bytes,
    ext: str,
    spec: DecodeSpec,
    flip: bool = False,
    crop_at: float | None = None,
) -> np.ndarray:
    """Decode image bytes into uint8 ``(R, R, C)`` (R = ``spec.resolution``).

    Sized by ``spec.resize`` (one bicubic resample, antialiased when shrinking; see the
    module docstring). ``crop_at`` in [0, 1] places the square of ``random_crop`` along
    the longer side (None: centred); the other policies ignore it. ``flip`` mirrors the
    result left-right.

    Raises:
        BadSample: the bytes are not a decodable image of an allowed format, the mode is
            not one of :data:`ACCEPTED_MODES`, or the header claims more than
            ``spec.max_pixels`` pixels (refused before any pixel data is decoded).
    """
    if crop_at is not None and not 0.0 <= crop_at <= 1.0:
        raise ValueError(f"crop_at must be in [0, 1]; got {crop_at!r}")
    image = _open(data, ext, spec)
    res = spec.resolution
    try:
        _check(image, spec)
        if image.format == "JPEG" and min(image.size) >= 2 * res:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below R on either side).
            image.draft(spec.mode, (res, res))
        image.load()  # the first frame only (GIF, TIFF, APNG, WEBP)
        if image.mode not in ACCEPTED_MODES:  # draft() may change the mode
            _check(image, spec)
        orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
        if orientation not in (1, None):
            image = ImageOps.exif_transpose(image)
        if image.mode in _WIDE_MODES:
            image = _to_8bit(image)
        image = _convert(image, spec)
        image = _size(image, spec, crop_at)
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
