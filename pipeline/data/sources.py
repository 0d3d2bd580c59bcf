"""Image sources for ``fmpipe prepare``: random access to ``(image, label)`` by index.

A :class:`Source` is a small, picklable description of a dataset, not the images: a Ray
task that builds one shard receives the source once and loads only the indices of its own
shard, so images are never shipped between processes. Four kinds exist, chosen by a spec
string (``build_source``):

- ``digits``: scikit-learn's bundled UCI handwritten digits (1,797 labelled 8x8 images,
  shipped inside the package, no download); grey levels 0..16 become 0..255, mode ``L``.
- ``folder:PATH``: one subfolder per class (classes sorted by name, files found
  recursively), any format Pillow reads; a folder with images and no subfolders is an
  unlabelled dataset; ``x.cls`` beside ``x.png`` overrides the subfolder (see
  :class:`FolderSource`); ``s3://`` prefixes work. A local folder must be visible at the
  same path to every Ray worker.
- ``webdataset:ADDRESS``: another tool's WebDataset shards (:class:`WebDatasetSource`).
- ``synthetic:shapes``: procedurally drawn coloured shapes on random backgrounds, label =
  shape kind. Image ``i`` depends only on ``(seed, i)``, so any index range can be made
  independently, in any process, in any order.

Sources return images at their native size and mode; the shard writer converts them to the
configured channels and resizes + centre-crops them to the resolution.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import Config, PrepareConfig

SOURCE_FORMS = ("digits", "folder:PATH", "synthetic:shapes", "webdataset:ADDRESS")


class Source(ABC):
    """Random access to a labelled (or unlabelled) image collection.

    ``load(i)`` must return the same image for the same ``i`` in any process, so that shards
    built by different Ray tasks, or re-built on a later run, are byte-identical.
    """

    name: str  # e.g. "digits", "synthetic:shapes", "folder:/data/pets"
    class_names: list[str]  # label i is class_names[i]; empty: unlabelled

    @property
    def channels(self) -> int | None:
        """The channels the source's own images call for (None: ``prepare.channels``)."""
        return None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> tuple[Image.Image, int | None]:
        """Image ``index`` (native size and mode) and its label (None when unlabelled)."""

    def metadata(self, index: int) -> dict[str, Any]:
        """Extra per-sample metadata stored in the sample's ``.json`` (e.g. the file)."""
        return {}

    def fingerprint(self, indices: Sequence[int]) -> str:
        """A string that changes whenever the images of ``indices`` may have changed.

        ``fmpipe prepare`` skips re-building a shard when its fingerprint (together with the
        output settings) matches the one recorded when the shard was written.
        """
        return self.name

    def label_name(self, label: int | None) -> str | None:
        return None if label is None or not self.class_names else self.class_names[label]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images (1797, 8, 8) float 0..16, labels (1797,) int)``.

    Reads the CSV that ships inside scikit-learn directly (what ``load_digits`` reads),
    which skips importing scikit-learn itself (about 2 s); falls back to ``load_digits``.
    """
    import gzip
    from importlib.util import find_spec

    spec = find_spec("sklearn")
    if spec is not None and spec.origin:
        csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            with gzip.open(csv, "rt") as handle:
                data = np.loadtxt(handle, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


class DigitsSource(Source):
    """scikit-learn's UCI digits: 1,797 grey 8x8 images of 0..9 (values 0..16 -> 0..255)."""

    def __init__(self) -> None:
        images, labels = load_digits_arrays()
        # 0..16 -> 0..255, rounded; (n, 8, 8) uint8
        self.images = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.labels = labels
        self.name = "digits"
        self.class_names = [str(k) for k in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[Image.Image, int | None]:
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])


def image_extensions() -> set[str]:
    """Lower-case file extensions (with the dot) of every format Pillow can open."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


class FolderSource(Source):
    """An image folder: ``ROOT/<class>/**/<image>``; classes are subfolders sorted by name.

    ``ROOT`` is a local path or an ``s3://bucket/prefix`` (listed and read through
    :mod:`pipeline.storage`). Files are found recursively and sorted, hidden files and
    folders are ignored, and a file counts when its extension is one Pillow opens.

    Side files: an image ``x.png`` with ``x.cls`` beside it takes the label in that file
    instead of its subfolder's: a class name, or an integer, the class's id (its place in
    the sorted class list, which is the subfolders and the names the ``.cls`` files hold;
    with no names at all, the integers themselves, as ``0..max``). An image with neither
    a ``.cls`` nor a class folder, in a labelled folder, is left out.

    Anything else is counted in ``skipped`` with its reason (a file that is not an image,
    a bad ``.cls``, an image outside every class folder); whether an image really decodes
    is found out when its shard is built: unreadable ones are then left out and reported.
    """

    def __init__(
        self, root: str | os.PathLike[str], size_hint: int = 0, storage: Any = None
    ) -> None:
        # size_hint: the stored resolution; JPEGs then decode at a reduced scale that still
        # leaves at least twice that size (much faster for large photos)
        self.size_hint = int(size_hint)
        self.storage = storage
        text = str(root)
        self.is_s3 = text.startswith("s3://")
        if self.is_s3:
            from pipeline.storage import resolve

            location = resolve(text, storage)
            self.root: Any = location.uri
            listing = _list_s3_files(location)
        else:
            self.root = Path(root).expanduser().absolute()
            if not self.root.is_dir():
                raise ValueError(f"folder source '{self.root}' does not exist or is not a folder")
            listing = _list_local_files(self.root)
        extensions = image_extensions()
        self.skipped: list[tuple[str, str]] = []
        images = sorted(rel for rel in listing if Path(rel).suffix.lower() in extensions)
        stems = {rel.rsplit(".", 1)[0] for rel in images}
        side: dict[str, str] = {}  # image stem -> .cls text
        for rel in sorted(listing):
            suffix = Path(rel).suffix.lower()
            if suffix in extensions:
                continue
            stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
            if suffix == ".cls" and stem in stems:
                try:
                    side[stem] = self._read(rel).decode("utf-8").strip()
                except (UnicodeDecodeError, OSError) as exc:
                    self.skipped.append((rel, f"bad label: .cls unreadable ({exc})"))
                    side[stem] = ""
                continue
            what = f"{suffix} file" if suffix else "file without an extension"
            self.skipped.append((rel, f"not an image ({what})"))
        subdirs = sorted({rel.split("/", 1)[0] for rel in images if "/" in rel})
        names = set(subdirs) | {v for v in side.values() if v and not _is_int(v)}
        ints = [int(v) for v in side.values() if v and _is_int(v)]
        if names:
            self.class_names = sorted(names)
        elif ints:
            self.class_names = [str(k) for k in range(max(max(ints), 0) + 1)]
        else:
            self.class_names = []
        index = {name: i for i, name in enumerate(self.class_names)}
        files: list[str] = []
        labels: list[int] = []
        self.ignored_top_level = 0  # image files beside class folders (not in any class)
        for rel in images:
            stem = rel.rsplit(".", 1)[0]
            if not self.class_names:
                files.append(rel)
                continue
            if stem in side:
                value = side[stem]
                if _is_int(value):
                    label = int(value) if 0 <= int(value) < len(self.class_names) else None
                else:
                    label = index.get(value)
                if label is None:
                    self.skipped.append(
                        (rel, f"bad label: .cls holds {value!r}, not one of the "
                              f"{len(self.class_names)} classes")
                    )  # fmt: skip
                    continue
            elif "/" in rel:
                label = index[rel.split("/", 1)[0]]
            else:
                self.ignored_top_level += 1
                self.skipped.append((rel, "no label: beside the class folders, no .cls"))
                continue
            files.append(rel)
            labels.append(label)
        if not files:
            shown = ", ".join(sorted(extensions & {".png", ".jpg", ".jpeg", ".webp", ".bmp"}))
            raise ValueError(
                f"folder source '{self.root}' holds no images (looked for files such as "
                f"{shown} in {'its class subfolders' if subdirs else 'it'})"
            )
        self.files = files
        self.labels = labels
        self.stat = {rel: listing[rel] for rel in files}
        self.name = f"folder:{self.root}"

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return Path(self.root) / self.files[index]

    def _read(self, rel: str) -> bytes:
        if self.is_s3:
            from pipeline.storage import resolve

            return resolve(f"{self.root}/{rel}", self.storage).read_bytes()
        return (Path(self.root) / rel).read_bytes()

    def load(self, index: int) -> tuple[Image.Image, int | None]:
        import io

        source: Any = io.BytesIO(self._read(self.files[index])) if self.is_s3 else self.path(index)
        with Image.open(source) as image:
            if self.size_hint and image.format == "JPEG":
                image.draft(image.mode, (2 * self.size_hint, 2 * self.size_hint))
            image.load()  # decodes now: a broken file fails here, inside the with
            upright = _exif_upright(image)  # multi-frame files give their first frame
            if upright is image:
                upright = image.copy()
        label = self.labels[index] if self.class_names else None
        return upright, label

    def metadata(self, index: int) -> dict[str, Any]:
        return {"file": self.files[index]}

    def fingerprint(self, indices: Sequence[int]) -> str:
        digest = hashlib.sha256(self.name.encode())
        digest.update("\0".join(self.class_names).encode())
        for index in indices:
            rel = self.files[index]
            size, version = self.stat[rel]
            label = self.labels[index] if self.labels else ""
            digest.update(f"{rel}:{size}:{version}:{label}\n".encode())
        return digest.hexdigest()


def _is_int(text: str) -> bool:
    text = text.strip()
    return bool(text) and (text.lstrip("+-").isdigit())


def _list_local_files(root: Path) -> dict[str, tuple[int, str]]:
    """``{relative posix path: (size, mtime_ns)}`` of the non-hidden files below ``root``."""
    found: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            try:
                stat = path.stat()
            except OSError:
                continue
            found[path.relative_to(root).as_posix()] = (stat.st_size, str(stat.st_mtime_ns))
    return found


def _list_s3_files(location: Any) -> dict[str, tuple[int, str]]:
    """The same for an S3 prefix (one recursive listing through pyarrow)."""
    from pyarrow import fs as pafs

    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    try:
        infos = location.filesystem.get_file_info(selector)
    except OSError as exc:
        from pipeline.storage import StorageInputError

        raise StorageInputError(f"cannot list folder source '{location.uri}': {exc}") from None
    if not infos:
        raise ValueError(f"folder source '{location.uri}' does not exist or is empty")
    base = location.path.rstrip("/") + "/"
    found: dict[str, tuple[int, str]] = {}
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.startswith(base):
            continue
        rel = info.path[len(base) :]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        found[rel] = (int(info.size or 0), str(info.mtime_ns or 0))
    return found


def _exif_upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (photos taken sideways), if any."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is not worth losing the image over
        return image


SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross")
SHAPES_VERSION = 1  # bump when the drawing changes: invalidates shards of earlier versions


class ShapesSource(Source):
    """Coloured shapes on random backgrounds; image ``i`` depends only on ``(seed, i)``.

    Each image holds one shape (label = its kind in ``SHAPE_KINDS``) of random size,
    position, rotation and colour on a random background colour (the two colours are kept
    apart in luminance so that the shape is always visible). Shapes are drawn at twice the
    resolution and box-filtered down, which anti-aliases their edges.
    """

    def __init__(self, num_samples: int, resolution: int, seed: int) -> None:
        self.num_samples = int(num_samples)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.name = "synthetic:shapes"
        self.class_names = list(SHAPE_KINDS)

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int) -> tuple[Image.Image, int | None]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return draw_shape(self.seed, index, self.resolution)

    def metadata(self, index: int) -> dict[str, Any]:
        return {"seed": self.seed}

    def fingerprint(self, indices: Sequence[int]) -> str:
        return f"{self.name}:v{SHAPES_VERSION}:seed={self.seed}:res={self.resolution}"


def _random_colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _luma(colour: tuple[int, int, int]) -> float:
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b


def draw_shape(seed: int, index: int, resolution: int) -> tuple[Image.Image, int]:
    """The ``index``-th shapes image for ``seed``: (RGB image of ``resolution``², label)."""
    # A string seed is hashed with SHA-512 by random.Random: the same in every process and
    # independent of PYTHONHASHSEED, and (seed, index) pairs never collide.
    rng = random.Random(f"fmpipe-shapes:{seed}:{index}")
    label = rng.randrange(len(SHAPE_KINDS))
    background = _random_colour(rng)
    colour = _random_colour(rng)
    if abs(_luma(colour) - _luma(background)) < 64:
        # push the shape's colour to the far side of the background's brightness
        shift = 128 if _luma(background) < 128 else -128
        colour = tuple(max(0, min(255, c + shift)) for c in colour)  # type: ignore[assignment]
    scale = 2  # supersampling factor
    size = resolution * scale
    radius = rng.uniform(0.18, 0.42) * size
    margin = radius * 0.9
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    kind = SHAPE_KINDS[label]
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon(_polygon(kind, cx, cy, radius, angle), fill=colour)
    return image.reduce(scale), label


def _polygon(
    kind: str, cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(radius * 0.8, k * math.pi / 2 + math.pi / 4) for k in range(4)]
    elif kind == "triangle":
        corners = [(radius, k * 2 * math.pi / 3) for k in range(3)]
    elif kind == "star":
        corners = [(radius if k % 2 == 0 else radius * 0.42, k * math.pi / 5) for k in range(10)]
    elif kind == "cross":
        arm, half = radius, radius * 0.33
        outline = [
            (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half),
            (-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
        ]  # fmt: skip
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline]
    else:  # pragma: no cover - guarded by SHAPE_KINDS
        raise ValueError(f"unknown shape kind '{kind}'")
    return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for r, a in corners]


SYNTHETIC: dict[str, type[ShapesSource]] = {"shapes": ShapesSource}


def parse_source_spec(spec: str) -> tuple[str, str]:
    """``"folder:/data"`` -> ("folder", "/data"); ValueError naming the allowed forms."""
    text = spec.strip()
    kind, _, arg = text.partition(":")
    if text == "digits":
        return "digits", ""
    if kind == "folder" and arg.strip():
        return "folder", arg.strip()
    if kind == "synthetic" and arg in SYNTHETIC:
        return "synthetic", arg
    if kind == "webdataset" and arg.strip():
        return "webdataset", arg.strip()
    if kind == "synthetic":
        raise ValueError(
            f"unknown synthetic source '{arg}' in source '{spec}'; "
            f"allowed: {', '.join('synthetic:' + name for name in SYNTHETIC)}"
        )
    hint = ""
    if "://" in text:  # an object-store address: images there, or shards
        hint = f" (images there: folder:{text}; WebDataset shards there: webdataset:{text})"
    elif os.sep in text or text.startswith((".", "~")):  # a path: most likely a folder
        hint = f" (a folder of images: folder:{text})"
    raise ValueError(f"unknown source '{spec}'; allowed forms: {', '.join(SOURCE_FORMS)}{hint}")


def build_source(spec: str, cfg: PrepareConfig, seed: int, config: Config | None = None) -> Source:
    """The source named by ``spec``: ``digits``, ``folder:PATH``, ``synthetic:NAME`` or
    ``webdataset:ADDRESS``.

    ``cfg.num_samples`` and ``cfg.resolution`` size synthetic sources; ``seed`` draws them.
    ``config`` (the whole config) gives S3 folders and WebDataset addresses their storage
    settings, and the WebDataset source its ``data.*`` label and resize settings.
    Raises ValueError for an unknown spec (listing the allowed forms) or a bad folder.
    """
    kind, arg = parse_source_spec(spec)
    storage = config.storage if config is not None else None
    if kind == "digits":
        return DigitsSource()
    if kind == "folder":
        return FolderSource(arg, size_hint=cfg.resolution, storage=storage)
    if kind == "webdataset":
        data = config.data if config is not None else None
        return WebDatasetSource(
            arg,
            resolution=cfg.resolution,
            # prepare.channels left unset: the images' own (1 when every one is grey)
            channels=cfg.channels if "channels" in cfg.model_fields_set else None,
            storage=storage,
            label_source=data.label_source if data else "auto",
            label_field=data.label_field if data else "label",
            resize=data.resize if data else "center_crop",
            background=data.alpha_background if data else "black",
            max_pixels=data.max_pixels if data else 64 * 1024 * 1024,
            seed=seed,
        )
    return SYNTHETIC[arg](cfg.num_samples, cfg.resolution, seed)


def default_dataset_name(spec: str) -> str:
    """A directory name for the dataset of ``spec`` when no output is given."""
    kind, arg = parse_source_spec(spec)
    if kind == "folder":
        if arg.startswith("s3://"):
            return arg.rstrip("/").rsplit("/", 1)[-1] or "folder"
        return Path(arg).expanduser().absolute().name or "folder"
    if kind == "webdataset":
        from pipeline.config import dataset_name

        return dataset_name(arg) or "webdataset"
    return kind if kind == "digits" else f"{kind}-{arg}"


# -- another tool's WebDataset shards ---------------------------------------------------


def _reason_kind(reason: str) -> str:
    """``"undecodable .png: OSError: ..."`` -> ``"undecodable .png"`` (for the summary)."""
    return reason.split(":", 1)[0].split("(", 1)[0].strip() or reason


def _image_mode(members: dict[str, bytes]) -> str:
    """The PIL mode of a sample's image from its header alone ("" when that does not
    parse: the sample is then reported when its shard is built)."""
    import io

    from pipeline.data.stream import _IMAGE_PREFERENCE

    ext = next(e for e in _IMAGE_PREFERENCE if e in members)
    try:
        with Image.open(io.BytesIO(members[ext])) as image:
            return str(image.mode)
    except Exception:  # any decoder error: not this scan's to judge
        return ""


class WebDatasetSource(Source):
    """Another tool's WebDataset shards (``webdataset:ADDRESS``), re-encoded by ``prepare``.

    The address is anything :func:`pipeline.data.address.list_shards` takes (a folder or
    prefix of ``.tar``, a brace pattern, a list; local or ``s3://``). Building the source
    reads every shard once, one at a time, and keeps only a small record per sample (its
    shard, the byte span of its members in the tar, its label id), never the images:
    members are grouped into samples by the stream's tar walk, labels read by
    ``data.label_source`` / ``data.label_field`` (:mod:`pipeline.data.labels`; the class
    names are the raw labels as :func:`~pipeline.data.labels.class_map` orders them).
    Samples that cannot be used (no image, a bad or missing label, a repeated key, a
    damaged tar) are counted in ``skipped`` with their reasons. ``load(i)`` then reads just
    sample ``i``'s span (a ranged read on S3) and decodes its image with
    :func:`~pipeline.data.decode.decode_image` (``data.resize``, centre crop by default;
    ``data.alpha_background``; ``data.max_pixels``) to the prepare resolution; an image
    that does not decode is left out of its shard and reported. Nothing is written under
    the address.
    """

    def __init__(
        self,
        address: str,
        *,
        resolution: int,
        channels: int | None,
        storage: Any = None,
        label_source: str = "auto",
        label_field: str = "label",
        resize: str = "center_crop",
        background: str = "black",
        max_pixels: int = 64 * 1024 * 1024,
        seed: int = 0,
    ) -> None:
        from pipeline.data.address import address_text, list_shards
        from pipeline.data.decode import DecodeSpec
        from pipeline.data.labels import LabelSpec

        self.address = address_text(address)
        self.storage = storage
        self.labels_spec = LabelSpec(source=label_source, field=label_field)
        self.modes: set[str] = set()  # the PIL modes of the usable samples' images
        self.decode = DecodeSpec(
            resolution=resolution,
            channels=channels or 3,  # None: set from the modes once every shard is scanned
            resize=resize,
            background=background,
            max_pixels=max_pixels,
        )
        self.seed = int(seed)
        self.name = f"webdataset:{self.address}"
        entries = list_shards(self.address, storage)
        self.shard_uris = [entry.uri for entry in entries]
        root = _common_folder(self.shard_uris)
        self.shard_names = [uri[len(root) :].lstrip("/") or uri for uri in self.shard_uris]
        self.skipped: list[tuple[str, str]] = []  # (shard:key, why) of samples left out
        shard_of: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        keys: list[str] = []
        raws: list[str | None] = []
        versions = hashlib.sha256()
        for number, entry in enumerate(entries):
            data = self._location(number).read_bytes()
            versions.update(
                f"{entry.uri}:{len(data)}:{hashlib.sha256(data).hexdigest()}\n".encode()
            )
            for key, span, raw in self._scan(number, data):
                shard_of.append(number)
                starts.append(span[0])
                ends.append(span[1])
                keys.append(key)
                raws.append(raw)
            del data  # one shard in memory at a time
        if channels is None:
            from dataclasses import replace

            from pipeline.data.index import GREY_MODES

            grey = bool(self.modes) and self.modes <= GREY_MODES  # the index's rule
            self.decode = replace(self.decode, channels=1 if grey else 3)
        from pipeline.data.labels import class_map

        self.class_names, classes = class_map(raw for raw in raws if raw is not None)
        keep = [i for i, raw in enumerate(raws) if not classes or raw is not None]
        for i, raw in enumerate(raws):
            if classes and raw is None:
                self.skipped.append(
                    (f"{self.shard_names[shard_of[i]]}:{keys[i]}", "bad label: missing")
                )
        self.shard_of = np.asarray([shard_of[i] for i in keep], dtype=np.int32)
        self.starts = np.asarray([starts[i] for i in keep], dtype=np.int64)
        self.ends = np.asarray([ends[i] for i in keep], dtype=np.int64)
        self.keys = [keys[i] for i in keep]
        raw_kept = [raws[i] for i in keep]
        self.label_ids = np.asarray(
            [classes[r] if classes and r is not None else -1 for r in raw_kept], dtype=np.int64
        )
        settings = f"{self.labels_spec}:{self.decode}:seed={self.seed}:" + "\0".join(
            self.class_names
        )
        versions.update(settings.encode())
        self._fingerprint = versions.hexdigest()
        self._open: tuple[int, Any] | None = None
        if not self.keys:
            shown = "; ".join(f"{what}: {why}" for what, why in self.skipped[:3])
            raise ValueError(
                f"webdataset source '{self.address}' holds no usable sample "
                f"({len(self.skipped)} left out{': ' + shown if shown else ''})"
            )

    @property
    def channels(self) -> int | None:
        return self.decode.channels

    # -- scanning
    def _location(self, number: int) -> Any:
        from pipeline.storage import resolve

        return resolve(self.shard_uris[number], self.storage)

    def _scan(self, number: int, data: bytes) -> list[tuple[str, tuple[int, int], str | None]]:
        """``[(key, (start, end) of its members in the tar, raw label)]`` of one shard."""
        import io
        import tarfile

        from pipeline.data.decode import BadSample
        from pipeline.data.labels import raw_label
        from pipeline.data.stream import _IMAGE_PREFERENCE, _KEY_RE, ShardStats, _iter_tar

        shard = self.shard_names[number]
        # byte spans by key, in tar order (the same grouping as the stream's walk)
        spans: list[tuple[str, int, int]] = []
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    match = _KEY_RE.match(member.name)
                    if not member.isfile() or not match:
                        continue
                    end = member.offset_data + -(-member.size // 512) * 512
                    key = match.group(1)
                    if spans and spans[-1][0] == key:
                        spans[-1] = (key, spans[-1][1], end)
                    else:
                        spans.append((key, member.offset, end))
        except (tarfile.TarError, EOFError, OSError, ValueError):
            pass  # the walk below says what broke
        stats = ShardStats(shard=shard, declared=0)
        found: list[tuple[str, tuple[int, int], str | None]] = []
        seen: set[str] = set()
        for position, sample in enumerate(_iter_tar(data, stats)):
            try:
                if sample.incomplete or position >= len(spans):
                    raise BadSample("incomplete: the tar broke while this sample was read")
                if sample.key in seen or spans[position][0] != sample.key:
                    raise BadSample("duplicate key (tar members not grouped by key)")
                seen.add(sample.key)
                if not any(ext in sample.members for ext in _IMAGE_PREFERENCE):
                    has = ", ".join(sorted(sample.members)) or "nothing"
                    raise BadSample(f"missing image (sample has: {has})")
                raw = raw_label(sample.members, self.labels_spec)
            except BadSample as exc:
                self.skipped.append((f"{shard}:{sample.key}", exc.reason))
                continue
            found.append((sample.key, spans[position][1:], raw))
            mode = _image_mode(sample.members)
            if mode:
                self.modes.add(mode)
        if stats.error:
            self.skipped.append((shard, stats.error))
        return found

    # -- Source
    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = None  # an open file does not travel to Ray tasks
        return state

    def _read_span(self, number: int, start: int, end: int) -> bytes:
        if self._open is None or self._open[0] != number:
            if self._open is not None:
                self._open[1].close()
            location = self._location(number)
            self._open = (number, location.filesystem.open_input_file(location.path))
        return self._open[1].read_at(end - start, start)

    def load(self, index: int) -> tuple[Image.Image, int | None]:
        from pipeline.data.coupling import sample_seed
        from pipeline.data.decode import decode_image
        from pipeline.data.stream import _IMAGE_PREFERENCE, ShardStats, _iter_tar

        number = int(self.shard_of[index])
        span = self._read_span(number, int(self.starts[index]), int(self.ends[index]))
        stats = ShardStats(shard=self.shard_names[number], declared=1)
        samples = list(_iter_tar(span + b"\0" * 1024, stats))
        if stats.error or len(samples) != 1:
            raise ValueError(f"the shard changed since it was scanned ({stats.error or 'keys'})")
        members = samples[0].members
        ext = next(e for e in _IMAGE_PREFERENCE if e in members)
        crop_at = None
        if self.decode.resize == "random_crop":  # fixed per sample: same input, same bytes
            key = self.keys[index]
            crop_at = (sample_seed(self.seed, 0, key, stream="crop") >> 10) / 2.0**53
        array = decode_image(members[ext], ext, self.decode, crop_at=crop_at)
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        label = int(self.label_ids[index]) if self.class_names else None
        return image, label

    def metadata(self, index: int) -> dict[str, Any]:
        number = int(self.shard_of[index])
        return {"file": f"{self.shard_names[number]}:{self.keys[index]}"}

    def fingerprint(self, indices: Sequence[int]) -> str:
        return f"{self.name}:{self._fingerprint}"


def _common_folder(uris: list[str]) -> str:
    """The longest ``/``-separated folder holding every one of ``uris``."""
    import posixpath

    folders = [uri.rsplit("/", 1)[0] for uri in uris]
    common = posixpath.commonpath([f.replace("://", ":/") for f in folders])
    return common.replace(":/", "://", 1) if "://" in folders[0] else common
