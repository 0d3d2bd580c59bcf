"""Image sources for ``fmpipe prepare``: random access to ``(image, label)`` by index.

A :class:`Source` is a small, picklable description of a dataset, not the images: a Ray
task that builds one shard receives the source once and loads only the indices of its own
shard, so images are never shipped between processes. Three kinds exist, chosen by a spec
string (``build_source``):

- ``digits``: scikit-learn's bundled UCI handwritten digits (1,797 labelled 8x8 images,
  shipped inside the package, no download); grey levels 0..16 become 0..255, mode ``L``.
- ``folder:PATH``: one subfolder per class (classes sorted by name, files found
  recursively), any format Pillow reads; a folder with images and no subfolders is an
  unlabelled dataset. The folder must be visible at the same path to every Ray worker.
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

from pipeline.config import PrepareConfig

SOURCE_FORMS = ("digits", "folder:PATH", "synthetic:shapes")


class Source(ABC):
    """Random access to a labelled (or unlabelled) image collection.

    ``load(i)`` must return the same image for the same ``i`` in any process, so that shards
    built by different Ray tasks, or re-built on a later run, are byte-identical.
    """

    name: str  # e.g. "digits", "synthetic:shapes", "folder:/data/pets"
    class_names: list[str]  # label i is class_names[i]; empty: unlabelled

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

    Files are found recursively and sorted, hidden files and folders are ignored, and a
    file counts when its extension is one Pillow opens. Whether a file really decodes is
    found out when its shard is built: unreadable files are then left out and reported.
    """

    def __init__(self, root: str | os.PathLike[str], size_hint: int = 0) -> None:
        # size_hint: the stored resolution; JPEGs then decode at a reduced scale that still
        # leaves at least twice that size (much faster for large photos)
        self.size_hint = int(size_hint)
        self.root = Path(root).expanduser().absolute()
        if not self.root.is_dir():
            raise ValueError(f"folder source '{self.root}' does not exist or is not a folder")
        extensions = image_extensions()
        subdirs = sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        files: list[str] = []  # paths relative to root, posix style
        labels: list[int] = []
        self.ignored_top_level = 0  # image files beside class folders (not in any class)
        if subdirs:
            self.class_names = [p.name for p in subdirs]
            for label, subdir in enumerate(subdirs):
                for path in _walk_images(subdir, extensions):
                    files.append(path.relative_to(self.root).as_posix())
                    labels.append(label)
            self.ignored_top_level = len(_walk_images(self.root, extensions, recursive=False))
        else:
            self.class_names = []
            files = [
                p.relative_to(self.root).as_posix() for p in _walk_images(self.root, extensions)
            ]
        if not files:
            shown = ", ".join(sorted(extensions & {".png", ".jpg", ".jpeg", ".webp", ".bmp"}))
            raise ValueError(
                f"folder source '{self.root}' holds no images (looked for files such as "
                f"{shown} in {'its class subfolders' if subdirs else 'it'})"
            )
        self.files = files
        self.labels = labels
        self.name = f"folder:{self.root}"

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def load(self, index: int) -> tuple[Image.Image, int | None]:
        with Image.open(self.path(index)) as image:
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
            try:
                stat = self.path(index).stat()
                digest.update(f"{self.files[index]}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{self.files[index]}:missing\n".encode())
        return digest.hexdigest()


def _walk_images(root: Path, extensions: set[str], recursive: bool = True) -> list[Path]:
    found: list[Path] = []
    if not recursive:
        return sorted(
            p
            for p in root.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
        )
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if not filename.startswith(".") and Path(filename).suffix.lower() in extensions:
                found.append(Path(dirpath) / filename)
    return sorted(found)


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
    if kind == "synthetic":
        raise ValueError(
            f"unknown synthetic source '{arg}' in source '{spec}'; "
            f"allowed: {', '.join('synthetic:' + name for name in SYNTHETIC)}"
        )
    raise ValueError(f"unknown source '{spec}'; allowed forms: {', '.join(SOURCE_FORMS)}")


def build_source(spec: str, cfg: PrepareConfig, seed: int) -> Source:
    """The source named by ``spec``: ``digits``, ``folder:PATH`` or ``synthetic:NAME``.

    ``cfg.num_samples`` and ``cfg.resolution`` size synthetic sources; ``seed`` draws them.
    Raises ValueError for an unknown spec (listing the allowed forms) or a bad folder.
    """
    kind, arg = parse_source_spec(spec)
    if kind == "digits":
        return DigitsSource()
    if kind == "folder":
        return FolderSource(arg, size_hint=cfg.resolution)
    return SYNTHETIC[arg](cfg.num_samples, cfg.resolution, seed)


def default_dataset_name(spec: str) -> str:
    """A directory name for the dataset of ``spec`` when no output is given."""
    kind, arg = parse_source_spec(spec)
    if kind == "folder":
        return Path(arg).expanduser().absolute().name or "folder"
    return kind if kind == "digits" else f"{kind}-{arg}"
