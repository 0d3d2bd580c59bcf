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
