"""Labels as publishers store them in WebDataset samples, and how one becomes a class id.

Sources (``data.label_source``):

- ``cls``: the ``.cls`` member: an integer (``webdataset.ShardWriter`` writes ``3``) or a
  class name (``cat``);
- ``json``: a field of the ``.json`` member, a dotted path (``data.label_field``: ``label``,
  ``meta.class``), holding an integer or a string;
- ``txt``: the ``.txt`` member as a class name. Only when asked for: img2dataset and most
  caption datasets store *captions* there, which are not classes;
- ``none``: unlabelled, whatever the samples hold;
- ``auto`` (default): ``.cls`` when the sample has one, else the json field when the
  sample has a ``.json`` holding it, else unlabelled.

A raw label is a string: integers are normalised (``" 03\\n"`` -> ``"3"``). The class map
of a dataset (``{raw: id}``, built by :mod:`pipeline.data.index` over all samples) is the
integers themselves when every raw label is a non-negative integer, else the sorted
unique names numbered from 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.data.decode import BadSample

if TYPE_CHECKING:
    from pipeline.config import Config

__all__ = [
    "LABEL_SOURCES",
    "UNLABELLED",
    "LabelSpec",
    "class_map",
    "label_id",
    "raw_label",
]

LABEL_SOURCES = ("auto", "cls", "json", "txt", "none")
UNLABELLED = -1
_INTEGER = re.compile(r"^[+-]?\d+$")
_MAX_LABEL_CHARS = 200  # a longer "class name" is a caption or garbage: a bad label


@dataclass(frozen=True)
class LabelSpec:
    """Where a sample's label is (see the module doc)."""

    source: str = "auto"  # one of LABEL_SOURCES
    field: str = "label"  # dotted path inside .json (sources json and auto)

    def __post_init__(self) -> None:
        if self.source not in LABEL_SOURCES:
            raise ValueError(f"label source must be one of {', '.join(LABEL_SOURCES)}")
        if not self.field or any(not part for part in self.field.split(".")):
            raise ValueError(f"label field {self.field!r} is not a dotted path like meta.class")

    @classmethod
    def from_config(cls, cfg: Config) -> LabelSpec:
        return cls(source=cfg.data.label_source, field=cfg.data.label_field)


def _text(raw: bytes, ext: str) -> str:
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample(f"bad label: .{ext} is not UTF-8 text ({raw[:20]!r})") from None
    return _normalised(text, f".{ext}")


def _normalised(text: str, where: str) -> str:
    if not text:
        raise BadSample(f"bad label: {where} is empty")
    if len(text) > _MAX_LABEL_CHARS or "\n" in text:
        raise BadSample(f"bad label: {where} is not a class name ({text[:40]!r}...)")
    return str(int(text)) if _INTEGER.match(text) else text


def _json_field(raw: bytes, path: str) -> tuple[bool, Any]:
    """``(found, value)`` of the dotted ``path`` inside a ``.json`` member."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise BadSample("bad label: .json is not valid JSON") from None
    value: Any = body
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _from_json(raw: bytes, path: str) -> str | None:
    found, value = _json_field(raw, path)
    if not found or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadSample(
            f"bad label: .json field '{path}' is {type(value).__name__}, not an integer or "
            f"a class name ({str(value)[:40]!r})"
        )
    return _normalised(str(value).strip(), f".json field '{path}'")


def raw_label(members: Mapping[str, bytes], spec: LabelSpec) -> str | None:
    """The sample's raw label as a string (integers normalised), or None when it has none.

    Raises:
        BadSample: ``"bad label: ..."``: a label member that is there but unreadable (not
            UTF-8, not JSON, empty, a non-scalar json field, a caption-sized text).
    """
    source = spec.source
    if source == "none":
        return None
    if source in ("cls", "auto") and "cls" in members:
        return _text(members["cls"], "cls")
    if source == "cls":
        return None
    if source in ("json", "auto") and "json" in members:
        return _from_json(members["json"], spec.field)
    if source == "txt" and "txt" in members:
        return _text(members["txt"], "txt")
    return None


def class_map(raw_values: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """``(class names, {raw: id})`` of a dataset's raw labels.

    All non-negative integers: the ids are the integers, and the names ``"0".."max"`` (the
    range, gaps included). Otherwise: the sorted unique names, numbered from 0. No labels:
    ``([], {})`` (unlabelled).
    """
    values = sorted(set(raw_values))
    if not values:
        return [], {}
    if all(_INTEGER.match(v) and int(v) >= 0 for v in values):
        top = max(int(v) for v in values)
        names = [str(i) for i in range(top + 1)]
        return names, {name: int(name) for name in names}
    return values, {name: i for i, name in enumerate(values)}


def label_id(members: Mapping[str, bytes], spec: LabelSpec, classes: Mapping[str, int]) -> int:
    """The sample's class id; -1 (:data:`UNLABELLED`) when the dataset is unlabelled.

    ``classes``: the dataset's ``{raw label: id}`` (empty: unlabelled dataset, every sample
    gets -1 whatever it holds).

    Raises:
        BadSample: ``"bad label: ..."``: unreadable, missing in a labelled dataset, or not
            one of the dataset's classes.
    """
    if not classes:
        return UNLABELLED
    raw = raw_label(members, spec)
    if raw is None:
        has = ", ".join(sorted(members)) or "nothing"
        raise BadSample(f"bad label: missing ({spec.source} label; sample has: {has})")
    if raw not in classes:
        raise BadSample(f"bad label: {raw!r} is not one of the dataset's {len(classes)} classes")
    return classes[raw]
