"""The ``_manifest.json`` written beside every split's shards (and beside sample shards).

Layout of a dataset root written by ``fmpipe prepare``::

    <root>/train/shard-000000.tar, shard-000001.tar, ..., _manifest.json
    <root>/val/shard-000000.tar, ..., _manifest.json

Each tar holds, sorted by key, ``{key}.png`` (or .jpg), ``{key}.cls`` (integer label, when
labelled) and ``{key}.json`` (metadata). Keys are zero-padded and unique across the dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_NAME = "_manifest.json"
FORMAT = "fmpipe-webdataset/1"
SPLITS = ("train", "val")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")  # hashlib's hexdigest: 64 lowercase hex digits


def bad_digest(value: object) -> str:
    """Why ``value`` cannot be a shard's sha256 (hexdigest), or "" when it can.

    A real digest is 64 lowercase hex digits; one of only zeros is a placeholder (no file
    hashes to it), so a manifest carrying it promises nothing about its shard's bytes.
    """
    if not isinstance(value, str) or not value:
        return "empty"
    if not _SHA256.match(value):
        return "not 64 lowercase hex digits"
    if value.count("0") == len(value):
        return "all zeros"
    return ""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name inside the split directory, e.g. "shard-000000.tar"
    num_samples: int
    sha256: str  # of the whole tar file
    first_key: str = ""  # smallest key in the shard (keys are sorted inside)


@dataclass
class Manifest:
    split: str  # "train" | "val" | "samples"
    resolution: int
    channels: int
    image_format: str  # "png" | "jpg"
    class_names: list[str] = field(default_factory=list)  # empty: unlabelled
    shards: list[ShardInfo] = field(default_factory=list)
    source: str = ""  # what produced it, e.g. "digits" or a model URI
    extra: dict[str, Any] = field(default_factory=dict)  # job-specific (seed, solver, ...)
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        body = asdict(self)
        body["num_samples"] = self.num_samples
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    def bad_digests(self) -> list[tuple[str, str, str]]:
        """``(shard name, stored sha256, why it is unusable)`` of every shard whose digest
        cannot be checked against its bytes (see :func:`bad_digest`)."""
        out = []
        for shard in self.shards:
            why = bad_digest(shard.sha256)
            if why:
                out.append((shard.name, str(shard.sha256), why))
        return out

    def content_hash(self) -> str:
        """sha256 of the shard list: changes exactly when the data changes."""
        digest = hashlib.sha256()
        for shard in sorted(self.shards, key=lambda s: s.name):
            digest.update(f"{shard.name}:{shard.num_samples}:{shard.sha256}\n".encode())
        return digest.hexdigest()

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            body = json.loads(text)
            body.pop("num_samples", None)
            body["shards"] = [ShardInfo(**shard) for shard in body.get("shards", [])]
            return cls(**body)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where} is not a valid fmpipe manifest: {exc}") from None
