"""Dataset addresses as users give them to WebDataset, and the shards they name.

An *address* is one of, or a list of (a YAML list, or one string with commas between the
parts)::

    s3://bucket/shards                    a folder / prefix: every ``*.tar`` directly below it
    ./shards                              the same, locally
    s3://bucket/shards/train-             a key prefix: the ``*.tar`` whose names start so
    s3://b/train-{000000..000999}.tar     a brace pattern: numeric ranges (zero-padded as
                                          written), ``{a,b}`` lists, several braces
    s3://b/a.tar,s3://b/b.tar             a list (commas inside braces do not split)

Local paths and any S3 endpoint go through :func:`pipeline.storage.resolve`. Listing costs
one call per folder (``list_objects_v2`` pages on S3, ``os.scandir`` locally), never a HEAD
per shard: a brace pattern is expanded here, then checked against the listing of each
folder it names. A pattern that matches nothing, a shard it names that is not there, or a
folder without ``.tar`` files is an :class:`AddressError` naming the address (a
:class:`pipeline.data.stream.DatasetError`: bad input, exit 2).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeline.data.stream import DatasetError
from pipeline.storage import Location, StorageError, StorageInputError, boto3_client, resolve

__all__ = [
    "AddressError",
    "ShardEntry",
    "address_text",
    "expand",
    "expand_braces",
    "list_shards",
    "source_roots",
    "split_address",
]

SHARD_SUFFIX = ".tar"
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_MAX_EXPANSION = 10_000_000  # shard names one pattern may expand to


class AddressError(DatasetError):
    """The address is malformed or names shards that are not there (bad input, exit 2)."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard found at an address: where, how big, and which version of its bytes."""

    uri: str  # normalised (pipeline.storage.Location.uri)
    size: int
    etag: str = ""  # S3 ETag, without quotes; "" locally
    mtime_ns: int = 0  # local modification time; 0 on S3

    @property
    def version(self) -> str:
        """What says the bytes changed without reading them: the ETag, else the mtime."""
        return self.etag or str(self.mtime_ns)


# --------------------------------------------------------------------------- parsing
def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside braces; refuses unbalanced braces."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth < 0:
                raise AddressError(f"dataset address '{text}': '}}' without its '{{'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise AddressError(f"dataset address '{text}': '{{' without its '}}'")
    parts.append("".join(current))
    return parts


def split_address(address: str | Sequence[str]) -> list[str]:
    """The parts of an address: a list as given, or a string split at top-level commas.

    Empty parts are dropped; no part at all is an :class:`AddressError`.
    """
    items = [address] if isinstance(address, str) else list(address)
    parts: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise AddressError(f"dataset address parts must be strings, got {item!r}")
        parts.extend(p.strip() for p in _split_top_level(item) if p.strip())
    if not parts:
        raise AddressError(
            "empty dataset address: give a folder or prefix of .tar shards, a brace pattern "
            "(s3://bucket/train-{000000..000099}.tar) or a comma-separated list"
        )
    return parts


def address_text(address: str | Sequence[str]) -> str:
    """The canonical one-line form of an address: its parts joined by commas."""
    return ",".join(split_address(address))


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise AddressError(f"brace pattern '{text}': '{{' without its '}}'")


def _alternatives(body: str, pattern: str) -> list[str]:
    match = _RANGE.match(body)
    if match:
        first, last = match.group(1), match.group(2)
        lo, hi = int(first), int(last)
        if hi < lo:
            raise AddressError(f"brace pattern '{pattern}': range {{{body}}} runs backwards")
        if hi - lo >= _MAX_EXPANSION:
            raise AddressError(f"brace pattern '{pattern}': range {{{body}}} is too long")
        padded = (len(first) > 1 and first.lstrip("-").startswith("0")) or (
            len(last) > 1 and last.lstrip("-").startswith("0")
        )
        width = max(len(first), len(last)) if padded else 0
        return [f"{n:0{width}d}" for n in range(lo, hi + 1)]
    if "," in _strip_inner(body):
        return [alt for part in _split_top_level(body) for alt in expand_braces(part)]
    raise AddressError(
        f"brace pattern '{pattern}': {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}"
    )


def _strip_inner(body: str) -> str:
    """``body`` without its nested braces' contents (to see top-level commas)."""
    out, depth = [], 0
    for char in body:
        depth += char == "{"
        if depth == 0:
            out.append(char)
        depth -= char == "}"
    return "".join(out)


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as WebDataset (braceexpand) does it, in order.

    ``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar`` (zero padding as written);
    ``{x,y}`` lists; several braces multiply; braces nest.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise AddressError(f"brace pattern '{pattern}': '}}' without its '{{'")
        return [pattern]
    end = _matching_brace(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    if "}" in head:
        raise AddressError(f"brace pattern '{pattern}': '}}' without its '{{'")
    middles = _alternatives(body, pattern)
    tails = expand_braces(tail)
    if len(middles) * len(tails) > _MAX_EXPANSION:
        raise AddressError(f"brace pattern '{pattern}' expands to too many names")
    return [head + m + t for m, t in itertools.product(middles, tails)]


def expand(address: str | Sequence[str]) -> list[str]:
    """Every part of the address with its braces expanded, duplicates dropped, in order.

    A result ending in ``.tar`` names one shard; anything else is a folder or key prefix.
    """
    seen: dict[str, None] = {}
    for part in split_address(address):
        for name in expand_braces(part):
            seen.setdefault(name, None)
    return list(seen)


# --------------------------------------------------------------------------- listing
def _list_s3(bucket: str, key: str, client: object) -> dict[str, ShardEntry]:
    """``{uri: entry}`` of the ``.tar`` objects directly below an S3 prefix (one paginated
    ``list_objects_v2``; the prefix may end in a partial name)."""
    out: dict[str, ShardEntry] = {}
    paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            for obj in page.get("Contents", []):
                name = obj["Key"]
                if name.endswith(SHARD_SUFFIX) and "/" not in name[len(key) :]:
                    uri = f"s3://{bucket}/{name}"
                    out[uri] = ShardEntry(uri, int(obj["Size"]), str(obj["ETag"]).strip('"'))
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        bad = code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "403", "404")
        bad = bad or code == "SignatureDoesNotMatch"
        raise (StorageInputError if bad else StorageError)(
            f"cannot list s3://{bucket}/{key}: {type(exc).__name__}: {exc}"
        ) from None
    return out


def _list_local(folder: str, name_prefix: str = "") -> dict[str, ShardEntry]:
    """``{uri: entry}`` of the ``.tar`` files directly in ``folder`` (one ``os.scandir``)."""
    out: dict[str, ShardEntry] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.endswith(SHARD_SUFFIX) or not entry.name.startswith(name_prefix):
                    continue
                if not entry.is_file():
                    continue
                stat = entry.stat()
                uri = os.path.join(folder, entry.name)
                out[uri] = ShardEntry(uri, int(stat.st_size), mtime_ns=int(stat.st_mtime_ns))
    except FileNotFoundError:
        return {}
    except NotADirectoryError:
        return {}
    except OSError as exc:
        raise StorageInputError(f"cannot list {folder}: {exc}") from None
    return out


class _Lister:
    """One listing per folder, cached for the address's parts."""

    def __init__(self, storage: object | None) -> None:
        self.storage = storage
        self._client: object | None = None
        self._cache: dict[tuple[str, str], dict[str, ShardEntry]] = {}

    def listing(self, folder: Location, name_prefix: str = "") -> dict[str, ShardEntry]:
        """The ``.tar`` entries directly below ``folder`` whose names start ``name_prefix``."""
        slot = (folder.uri, name_prefix)
        if slot not in self._cache:
            if folder.is_s3:
                if self._client is None:
                    self._client = boto3_client(self.storage)  # type: ignore[arg-type]
                key = folder.key
                prefix = (key + "/" if key else "") + name_prefix
                self._cache[slot] = _list_s3(folder.bucket or "", prefix, self._client)
            else:
                self._cache[slot] = _list_local(folder.path, name_prefix)
        return self._cache[slot]


def _parent(location: Location, storage: object | None) -> tuple[Location, str]:
    """``(folder, base name)`` of a file location."""
    if location.is_s3:
        if "/" not in location.path:
            raise AddressError(f"'{location.uri}' names a bucket, not a shard")
        uri, _, base = location.uri.rpartition("/")
        return resolve(uri, storage), base  # type: ignore[arg-type]
    return resolve(os.path.dirname(location.path)), os.path.basename(location.path)


def list_shards(address: str | Sequence[str], storage: object | None = None) -> list[ShardEntry]:
    """Every shard the address names, with size and ETag (S3) or mtime_ns (local).

    Order: the address's parts in order; inside a folder or prefix, sorted by name; a
    pattern in its expansion order. A shard named twice is listed once.

    Raises:
        AddressError: a pattern or folder that matches no ``.tar``, or a named shard that
            does not exist; the message names the address.
        StorageError: the store cannot be listed (``StorageInputError``: bucket, access).
    """
    text = address_text(address)
    lister = _Lister(storage)
    found: dict[str, ShardEntry] = {}
    for part in split_address(address):
        names = expand_braces(part)
        shards = [n for n in names if n.endswith(SHARD_SUFFIX)]
        folders = [n for n in names if not n.endswith(SHARD_SUFFIX)]
        if shards and folders:
            raise AddressError(
                f"dataset address '{text}': pattern '{part}' expands to both .tar shards and "
                f"other names (e.g. {folders[0]})"
            )
        missing: list[str] = []
        for name in shards:
            location = resolve(name, storage)  # type: ignore[arg-type]
            folder, _ = _parent(location, storage)
            entry = lister.listing(folder).get(location.uri)
            if entry is None:
                missing.append(location.uri)
            else:
                found.setdefault(entry.uri, entry)
        if missing:
            what = "matches no shard" if len(missing) == len(shards) else "names missing shards"
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            where = f"'{text}'" if part == text else f"'{text}': '{part}'"
            raise AddressError(
                f"dataset address {where} {what}: {len(missing)} of {len(shards)} "
                f"not found ({shown})"
            )
        for name in folders:
            found_here = _folder_shards(resolve(name, storage), lister, storage)  # type: ignore[arg-type]
            if not found_here:
                raise AddressError(
                    f"dataset address '{text}': no .tar shards in or starting with '{name}'"
                )
            for entry in found_here:
                found.setdefault(entry.uri, entry)
    return list(found.values())


def _folder_shards(location: Location, lister: _Lister, storage: object | None) -> list[ShardEntry]:
    """The ``.tar`` files in a folder / below a prefix; else those starting with its name."""
    inside = lister.listing(location)
    if not inside and location.path.strip("/") and (not location.is_s3 or location.key):
        folder, base = _parent(location, storage)
        inside = lister.listing(folder, base)
    return [inside[uri] for uri in sorted(inside)]


def source_roots(entries: Iterable[ShardEntry]) -> list[str]:
    """The folders (URIs) the shards live in: where nothing of fmpipe's may be written."""
    return sorted({entry.uri.rpartition("/")[0] for entry in entries})
