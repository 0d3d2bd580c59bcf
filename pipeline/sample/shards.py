"""Sample shards: ``{index:010d}.png`` + ``.json`` (+ ``.cls``, + ``.x1.npy``) in a
deterministic tar.

``.x1.npy`` (``sample.pairs``): the sample's ``x_1`` as the solver left it, float32
``(C, H, W)`` in the model's [-1, 1] range, in NumPy's ``.npy`` format (no pickle: a reader
loads it with ``allow_pickle=False``); the PNG is that array rounded to 8 bits.

Same WebDataset convention as the dataset shards (:mod:`pipeline.data.shards`, whose USTAR
header and PNG encoder are reused): members sorted by key, fixed headers, so the bytes and
the sha256 of a shard depend on its samples alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.shards import (
    SMALL_PNG_PIXELS,
    TAR_BLOCK,
    TAR_RECORD,
    encode_png_small,
    tar_header,
)

__all__ = [
    "KEY_WIDTH",
    "X1_SUFFIX",
    "ShardCheck",
    "check_shard",
    "encode_sample_png",
    "npy_bytes",
    "sample_key",
    "tar_bytes",
]

KEY_WIDTH = 10
X1_SUFFIX = ".x1.npy"  # the float32 x_1 of a coupled sample set


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in the ``.npy`` format (version 1.0 header, C order): deterministic bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def sample_key(index: int) -> str:
    return f"{index:0{KEY_WIDTH}d}"


def encode_sample_png(image: np.ndarray) -> bytes:
    """PNG of a uint8 ``(H, W, C)`` image, C in {1, 3}, deterministic bytes."""
    array = image[..., 0] if image.shape[-1] == 1 else image
    if array.shape[0] * array.shape[1] <= SMALL_PNG_PIXELS:
        return encode_png_small(array)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A USTAR archive of ``members`` (in the order given), padded to whole tar records."""
    parts: list[bytes] = []
    size = 0
    for name, data in members:
        chunk = tar_header(name, len(data)) + data + b"\0" * (-len(data) % TAR_BLOCK)
        parts.append(chunk)
        size += len(chunk)
    end = 2 * TAR_BLOCK
    parts.append(b"\0" * (end + (-(size + end) % TAR_RECORD)))
    return b"".join(parts)


def sample_members(
    index: int, png: bytes, meta: dict[str, Any], label: int | None, x_1: bytes | None = None
) -> list[tuple[str, bytes]]:
    """The members of one sample, sorted: ``.cls`` < ``.json`` < ``.png`` < ``.x1.npy``."""
    key = sample_key(index)
    members = [(f"{key}.png", png)]
    if x_1 is not None:
        members.append((f"{key}{X1_SUFFIX}", x_1))
    if label is not None:
        members.append((f"{key}.cls", str(int(label)).encode("ascii")))
    members.append(
        (f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    )
    return sorted(members)


@dataclass
class ShardCheck:
    """What :func:`check_shard` found in an existing shard object."""

    ok: bool
    num_samples: int
    sha256: str
    problem: str = ""


def check_shard(
    data: bytes,
    start: int,
    stop: int,
    conditional: bool,
    expect: dict[str, Any] | None = None,
    pairs: bool = False,
) -> ShardCheck:
    """Does ``data`` hold exactly samples ``start..stop-1``, each with its members (``pairs``:
    also ``.x1.npy``), and does the first sample's metadata agree with ``expect`` (seed,
    solver, model digest, ...)?"""
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return ShardCheck(False, 0, sha, "empty object")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            names = [m.name for m in members]
            first_json = next((m for m in members if m.name.endswith(".json")), None)
            meta = json.loads(tar.extractfile(first_json).read()) if first_json else {}
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        return ShardCheck(False, 0, sha, f"not a readable shard: {exc}")
    differ = sorted(k for k, v in (expect or {}).items() if meta.get(k) != v)
    if differ:
        shown = ", ".join(f"{k}={meta.get(k)!r} (expected {expect[k]!r})" for k in differ)
        return ShardCheck(False, 0, sha, f"written by another job: {shown}")
    expected = []
    for index in range(start, stop):
        key = sample_key(index)
        expected += [f"{key}.json", f"{key}.png"] + ([f"{key}.cls"] if conditional else [])
        expected += [f"{key}{X1_SUFFIX}"] if pairs else []
    if sorted(names) != sorted(expected) or names != sorted(names):
        count = sum(1 for n in names if n.endswith(".png"))
        return ShardCheck(
            False,
            count,
            sha,
            f"holds {count} samples / {len(names)} members, not [{start}, {stop})",
        )
    return ShardCheck(True, stop - start, sha)
