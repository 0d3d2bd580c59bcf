"""WebDataset shards as other tools write them (``webdataset.ShardWriter``), for the tests of
the index (tests/test_index.py) and of training on them (tests/test_foreign.py).

Imported as ``from foreign_data import ...`` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def _image(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    width, height = size
    channels = 1 if mode == "L" else 3
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, channels), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(buf, fmt)
    return buf.getvalue()


PNG_L = _image("PNG", (8, 8), "L")
JPG_RGB = _image("JPEG", (12, 10), "RGB")


def _samples(first: int, n: int, folder: str = "a.b/c") -> list[dict]:
    """n good samples: png (grey 8x8) and jpg (RGB 12x10) alternating, .cls 0/1/2."""
    out = []
    for i in range(first, first + n):
        image = {"png": PNG_L} if i % 2 == 0 else {"jpg": JPG_RGB}
        out.append({"__key__": f"{folder}/{i:06d}", **image, "cls": i % 3})
    return out


def _write(folder: Path, samples: list[dict], maxcount: int, name: str = "part") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{name}-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


def _dataset(folder: Path) -> None:
    """3 shards: 10 + 10 good samples, then a shard with 4 good, one image-less, one
    undecodable png and one with an unreadable .json label."""
    _write(folder, _samples(0, 20), maxcount=10)
    broken = [
        *_samples(20, 4),
        {"__key__": "a.b/c/000900", "cls": 1, "json": {"note": "no image"}},
        {"__key__": "a.b/c/000901", "png": b"\x89PNG not really", "cls": 1},
        {"__key__": "a.b/c/000902", "png": PNG_L, "json": b"{broken"},
    ]
    _write(folder, broken, maxcount=100, name="tail")


def _picture(fmt: str, size: tuple[int, int], mode: str) -> bytes:
    """An image of ``size`` in ``mode`` saved as ``fmt``, its pixels from a fixed seed."""
    width, height = size
    rgb = np.random.default_rng(width * 1000 + height).integers(0, 255, (height, width, 3))
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode == "I;16":
        image = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)  # mode I;16
    elif mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


# (extension, Pillow format, size, mode): what other tools' shards hold besides png/jpg
MIXED_IMAGES = [
    ("webp", "WEBP", (40, 30), "RGB"),
    ("bmp", "BMP", (1, 40), "RGB"),  # one pixel wide
    ("tiff", "TIFF", (300, 2), "CMYK"),  # aspect ratio 150
    ("gif", "GIF", (16, 16), "P"),
    ("png", "PNG", (9, 9), "LA"),
    ("png", "PNG", (12, 12), "RGBA"),
    ("png", "PNG", (10, 6), "I;16"),
    ("ppm", "PPM", (7, 13), "RGB"),
    ("jpeg", "JPEG", (64, 48), "L"),
]
MIXED_CLASSES = ("cat", "dog")


def _mixed_dataset(folder: Path) -> tuple[int, dict[str, int]]:
    """Every image of :data:`MIXED_IMAGES` twice, labelled by class NAME in ``.cls``
    (alternating cat/dog), under keys with dots and slashes in their folder part, plus a
    sample without an image, an undecodable one and one with an unreadable ``.cls``, in
    ShardWriter shards of 11; returns (good samples, their label histogram by name)."""
    samples, names = [], {}
    for i, (ext, fmt, size, mode) in enumerate(MIXED_IMAGES * 2):
        name = MIXED_CLASSES[i % 2]
        names[name] = names.get(name, 0) + 1
        samples.append({"__key__": f"x.y/z.w/{i:06d}", ext: _picture(fmt, size, mode), "cls": name})
    samples += [
        {"__key__": "x.y/z.w/000900", "cls": "cat", "json": {"note": "no image"}},
        {"__key__": "x.y/z.w/000901", "webp": b"RIFF not a webp", "cls": "dog"},
        {"__key__": "x.y/z.w/000902", "png": _picture("PNG", (8, 8), "RGB"), "cls": b"\xff\xfe"},
    ]
    _write(folder, samples, maxcount=11, name="mixed")
    return 2 * len(MIXED_IMAGES), names
