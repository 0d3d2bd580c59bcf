"""A small image classifier trained on the labelled dataset: in-domain features and accuracy.

Inception features know ImageNet photographs, not 16x16 digits; a classifier trained on the
dataset itself gives two measures that do:

- an in-domain Fréchet distance on its penultimate features (``ClassifierFeatures`` is a
  :class:`~pipeline.eval.features.FeatureNetwork`, so :mod:`pipeline.eval.frechet` applies);
- conditional accuracy: for samples generated for class y, the share it classifies as y,
  and confidence, the mean max softmax probability.

Layout of :class:`SmallClassifier` at resolution 16 (width w):

    stem conv 3x3 (C -> w) @16
    -> [conv s2 (w -> 2w), conv (2w -> 2w)] @8 -> [conv s2 (2w -> 4w), conv (4w -> 4w)] @4
    -> global average pool (4w) -> linear (4w -> feature_dim) -> SiLU   = features phi(x)
    -> linear (feature_dim -> num_classes)                              = logits

Every conv is conv-GroupNorm-SiLU; stride-2 blocks halve the map until it is 4x4 (at most
three times). Inputs are images in [-1, 1] (``u8 / 127.5 - 1``, the training range of the
generators). The file format (:func:`save_classifier`) is a plain dict of tensors, strings
and ints, read back with ``torch.load(weights_only=True)``: no pickled code ever runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.eval.features import FeatureNetworkError

FORMAT = "fmpipe-classifier/1"
_BATCH = 512  # images per forward pass at inference: bounds memory, not results

# ITU-R 601-2 luma, what Pillow's RGB -> L uses: an RGB sample meets a grey classifier as
# the dataset's own grey images were made.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ClassifierSpec:
    """Architecture and input protocol of a :class:`SmallClassifier`.

    Attributes:
        channels: C of the images it was trained on (1 or 3).
        resolution: R; inputs of another size are resized to R x R.
        num_classes: K.
        width: channels of the stem conv; doubled at each of the first two downsamplings.
            16 by default: at 16x16 that is ~1.8 M multiply-adds per image, so the default
            ten epochs on the 1,617 training digits take ~6 s of one CPU core, and got
            all 180 held-out digits right (seeds 0 and 1; 32 is ~3x slower per step).
        feature_dim: d of the penultimate features.
    """

    channels: int
    resolution: int
    num_classes: int
    width: int = 16
    feature_dim: int = 128

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"ClassifierSpec.{f.name} must be an int, got {value!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"ClassifierSpec.channels must be 1 or 3, got {self.channels}")
        if self.resolution < 4:
            raise ValueError(f"ClassifierSpec.resolution must be >= 4, got {self.resolution}")
        if self.num_classes < 2:
            raise ValueError(f"ClassifierSpec.num_classes must be >= 2, got {self.num_classes}")
        if self.width < 1 or self.feature_dim < 1:
            raise ValueError(
                f"ClassifierSpec.width and feature_dim must be >= 1, "
                f"got {self.width} and {self.feature_dim}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierSpec:
        """The spec of ``asdict(spec)``; ValueError on unknown or missing fields."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ClassifierSpec fields {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field missing
            raise ValueError(f"incomplete ClassifierSpec: {exc}") from None


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    """conv 3x3 (stride 1 or 2) -> GroupNorm -> SiLU: (B, cin, H, W) -> (B, cout, H/s, W/s)."""
    # gcd(8, cout) groups: 8 where the width allows it, never a count that does not divide.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        nn.GroupNorm(math.gcd(8, cout), cout),
        nn.SiLU(),
    )


class SmallClassifier(nn.Module):
    """Conv classifier: images (B, C, R, R) in [-1, 1] -> logits (B, K); see the module docs.

    ``features(x)`` -> (B, feature_dim), the penultimate activations phi(x) after SiLU;
    ``forward(x)`` = ``head(phi(x))``. GroupNorm (no batch statistics) makes the output for
    an image independent of the rest of its batch and of train/eval mode.
    """

    def __init__(self, spec: ClassifierSpec) -> None:
        super().__init__()
        self.spec = spec
        ch = spec.width
        layers: list[nn.Module] = [_conv_block(spec.channels, ch, 1)]
        size = spec.resolution
        for level in range(3):
            if size <= 4:
                break
            # channels double twice (w, 2w, 4w), then stay: width and cost stay bounded
            out = ch * 2 if level < 2 else ch
            layers += [_conv_block(ch, out, 2), _conv_block(out, out, 1)]
            ch, size = out, (size + 1) // 2
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(ch, spec.feature_dim)
        self.head = nn.Linear(spec.feature_dim, spec.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, R, R) in [-1, 1] -> (B, feature_dim) = SiLU(W mean_hw(body(x)) + b)."""
        h = self.body(x).mean(dim=(2, 3))  # global average pool
        return F.silu(self.embed(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# -- input protocol --------------------------------------------------------------------


def to_classifier_input(images: Tensor, spec: ClassifierSpec) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (N, spec.channels, R, R) in [-1, 1].

    x = u8 / 127.5 - 1. One channel meets a 3-channel spec repeated; three channels meet a
    1-channel spec as luma 0.299 R + 0.587 G + 0.114 B (Pillow's ``L``). Another size is
    resized to R x R with bilinear interpolation, antialiased when shrinking (no crop: the
    aspect ratio of a non-square input is not kept).
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"classifier: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"classifier: images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"classifier: images must be (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}"
        )
    x = images.float() / 127.5 - 1.0
    if x.shape[1] != spec.channels:
        if spec.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device)
            x = (x * luma[None, :, None, None]).sum(dim=1, keepdim=True)
    if x.shape[-2:] != (spec.resolution, spec.resolution):
        size = (spec.resolution, spec.resolution)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def _check_labels(labels: Tensor, n: int, num_classes: int) -> Tensor:
    """``labels`` as int64 (n,) in [0, num_classes), or ValueError."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (n,):
        raise ValueError(
            f"labels must be integer (N,) = ({n},), got {labels.dtype} {tuple(labels.shape)}"
        )
    labels = labels.long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


# -- training --------------------------------------------------------------------------


def _translate(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image moved by its own (dy, dx) in [-shift, shift]^2: (B, C, R, R) -> same.

    Pad by ``shift`` with edge replication (the background, whatever its value), then crop
    the R x R window at offset (shift + dy, shift + dx), gathered for the whole batch at
    once. Draws 2B integers from ``generator``.
    """
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (2, b), generator=generator)
    rows = offsets[0][:, None] + torch.arange(h)  # (B, R)
    cols = offsets[1][:, None] + torch.arange(w)  # (B, R)
    batch = torch.arange(b)[:, None, None]
    # advanced indexing on dims 0, 2, 3 -> (B, R, R, C): the sliced channel dim goes last
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * lr * (1.0 + math.cos(math.pi * progress))


def train_classifier(
    images: Tensor,
    labels: Tensor,
    spec: ClassifierSpec,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 5e-3,
    seed: int = 0,
    augment: bool = True,
    weight_decay: float = 1e-4,
    max_shift: int | None = None,
    num_threads: int | None = None,
) -> SmallClassifier:
    """Train a :class:`SmallClassifier` with cross-entropy on (images, labels); CPU.

    Minimises L = -(1/B) sum_i log softmax(f(x_i))_{y_i} with AdamW (``weight_decay``), a
    linear warmup over the first ~5% of steps and cosine decay to 0. With ``augment``,
    each batch is translated by up to ``max_shift`` pixels per image (default
    max(1, R // 16): 1 at 16x16, half a pixel of the 8x8 originals; 2 already costs
    accuracy on a short schedule); no flips, which would turn some classes into others.

    ``num_threads`` sets torch's intra-op threads for the call (restored after): on a
    shared, oversubscribed CPU, OpenMP threads that wait on each other at every small op
    can make two threads 10-40x slower than one.

    Deterministic given ``seed`` (on one machine and torch build): the initial weights come
    from ``torch.manual_seed(seed)`` inside a forked RNG (the caller's global RNG is left
    as it was), and the epoch shuffles and shifts from a ``torch.Generator`` seeded with it.

    Args:
        images: uint8 (N, C, H, W); resized / converted by :func:`to_classifier_input`.
        labels: int (N,) in [0, spec.num_classes).

    Returns:
        the trained model, in eval mode, on the CPU.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"train_classifier needs epochs >= 1, batch_size >= 1, lr > 0; "
            f"got {epochs}, {batch_size}, {lr}"
        )
    x = to_classifier_input(images, spec)
    n = x.shape[0]
    if n == 0:
        raise ValueError("train_classifier needs at least one image")
    y = _check_labels(labels, n, spec.num_classes)
    shift = max(1, spec.resolution // 16) if max_shift is None else max_shift
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _fit(x, y, spec, epochs, batch_size, lr, seed, augment, weight_decay, shift)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    x: Tensor,
    y: Tensor,
    spec: ClassifierSpec,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    augment: bool,
    weight_decay: float,
    shift: int,
) -> SmallClassifier:
    """The training loop of :func:`train_classifier` on float inputs x (N, C, R, R)."""
    n = x.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(spec)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)

    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = _translate(x[idx], shift, generator) if augment else x[idx]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, lr, warmup)
            loss = F.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


@torch.no_grad()
def _forward_batches(
    model: SmallClassifier, images: Tensor, device: str | torch.device
) -> tuple[Tensor, Tensor]:
    """uint8 (N, C, H, W) -> (features float32 (N, d), probabilities float32 (N, K)), CPU."""
    was_training = model.training
    model.eval()
    feats, probs = [], []
    try:
        for start in range(0, images.shape[0], _BATCH):
            x = to_classifier_input(images[start : start + _BATCH], model.spec).to(device)
            phi = model.features(x)
            feats.append(phi.float().cpu())
            probs.append(torch.softmax(model.head(phi).float(), dim=1).cpu())
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, model.spec.feature_dim), torch.zeros(0, model.spec.num_classes)
    return torch.cat(feats), torch.cat(probs)


@dataclass(frozen=True)
class ConditionalAccuracy:
    """How often the classifier agrees with the labels, overall and per class.

    Attributes:
        accuracy: (1/n) sum_i [argmax_k p_k(x_i) = y_i].
        per_class: {y: (accuracy over the images labelled y, their count)}, for the classes
            present; the counts sum to n.
        confidence: (1/n) sum_i max_k p_k(x_i), whatever the label.
        n: number of images.
    """

    accuracy: float
    per_class: dict[int, tuple[float, int]]
    confidence: float
    n: int


def _agreement(probs: Tensor, labels: Tensor) -> ConditionalAccuracy:
    """ConditionalAccuracy of probabilities (N, K) against labels (N,)."""
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("conditional accuracy needs at least one image")
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    per_class = {}
    for y in torch.unique(labels).tolist():
        mask = labels == y
        per_class[int(y)] = (float(correct[mask].mean()), int(mask.sum()))
    return ConditionalAccuracy(
        accuracy=float(correct.mean()),
        per_class=per_class,
        confidence=float(confidence.double().mean()),
        n=n,
    )


def evaluate(model: SmallClassifier, images: Tensor, labels: Tensor) -> dict[str, Any]:
    """Accuracy of ``model`` on labelled images.

    Returns:
        ``{"accuracy": float, "per_class_accuracy": {class: float}, "confidence": float}``
        (see :class:`ConditionalAccuracy`; classes absent from ``labels`` are left out).
    """
    labels = _check_labels(labels, images.shape[0], model.spec.num_classes)
    _, probs = _forward_batches(model, images, next(model.parameters()).device)
    result = _agreement(probs, labels)
    return {
        "accuracy": result.accuracy,
        "per_class_accuracy": {y: acc for y, (acc, _) in result.per_class.items()},
        "confidence": result.confidence,
    }


# -- the feature network ---------------------------------------------------------------


def weights_digest(model: SmallClassifier) -> str:
    """sha256 hex of the spec (JSON, sorted keys) and every state-dict entry, in order.

    Each entry contributes its name, dtype, shape and raw bytes, so equal weights under
    the same spec give the same digest in any process, and any changed value, a renamed
    entry or a different input protocol (resolution, channels) a different one.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(model.spec), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


class ClassifierFeatures:
    """A trained :class:`SmallClassifier` as a :class:`~pipeline.eval.features.FeatureNetwork`.

    Attributes:
        name: ``"classifier"``.
        key: ``"classifier:" + weights_digest(model)[:12]``: reference statistics computed
            with other weights (or another input protocol) never match.
        dim: ``spec.feature_dim``.

    Every method takes uint8 (N, C, H, W) images, C in {1, 3}, any H x W (see
    :func:`to_classifier_input` for the resize and channel conversion).
    """

    name = "classifier"

    def __init__(
        self,
        model: SmallClassifier,
        spec: ClassifierSpec | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if spec is not None and spec != model.spec:
            raise ValueError(f"spec {spec} differs from the model's {model.spec}")
        self.spec = model.spec
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dim = self.spec.feature_dim
        self.key = f"classifier:{weights_digest(model)[:12]}"

    def features(self, images: Tensor) -> np.ndarray:
        """uint8 (N, C, H, W) -> float64 (N, feature_dim) penultimate features phi(x)."""
        feats, _ = _forward_batches(self.model, images, self.device)
        return feats.double().numpy()

    def predict(self, images: Tensor) -> np.ndarray:
        """uint8 (N, C, H, W) -> float64 (N, K) class probabilities softmax(f(x))."""
        _, probs = _forward_batches(self.model, images, self.device)
        return probs.double().numpy()

    def conditional_accuracy(self, images: Tensor, labels: Tensor) -> ConditionalAccuracy:
        """Agreement of predictions with ``labels`` (N,): for generated samples, the classes
        they were generated for. See :class:`ConditionalAccuracy`."""
        labels = _check_labels(labels, images.shape[0], self.spec.num_classes)
        _, probs = _forward_batches(self.model, images, self.device)
        return _agreement(probs, labels)


# -- files -----------------------------------------------------------------------------

PathOrBuffer = str | os.PathLike[str] | IO[bytes]


def _where(target: PathOrBuffer | bytes) -> str:
    """How messages name a file: its path, a file object's name, else ``<BytesIO>``."""
    if isinstance(target, (str, os.PathLike)):
        return os.fspath(target)
    name = getattr(target, "name", None)
    return name if isinstance(name, str) else f"<{type(target).__name__}>"


def save_classifier(model: SmallClassifier, spec: ClassifierSpec, target: PathOrBuffer) -> None:
    """``torch.save`` of ``{"format": FORMAT, "spec": asdict(spec), "state_dict": ...}``.

    Only tensors, strings and ints: :func:`load_classifier` reads it with
    ``weights_only=True``. ``target`` is a path or a writable binary file object.
    """
    if spec != model.spec:
        raise ValueError(f"spec {spec} differs from the model's {model.spec}")
    state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    torch.save({"format": FORMAT, "spec": asdict(spec), "state_dict": state}, target)


def _read_payload(source: PathOrBuffer, where: str) -> dict[str, Any]:
    """The dict of a classifier file, checked for format tag and keys."""
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FeatureNetworkError(f"classifier file {where} does not exist") from None
    except Exception as exc:  # truncated zip, foreign pickle: torch raises several kinds
        raise FeatureNetworkError(
            f"classifier file {where} cannot be read as a torch file "
            f"(truncated or not one): {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(payload, dict):
        raise FeatureNetworkError(
            f"classifier file {where} holds a {type(payload).__name__}, not a dict with "
            f"format {FORMAT!r}"
        )
    if payload.get("format") != FORMAT:
        raise FeatureNetworkError(
            f"classifier file {where} has format tag {payload.get('format')!r}, expected {FORMAT!r}"
        )
    missing = {"spec", "state_dict"} - set(payload)
    if missing:
        raise FeatureNetworkError(f"classifier file {where} lacks keys {sorted(missing)}")
    if not isinstance(payload["spec"], dict) or not isinstance(payload["state_dict"], dict):
        raise FeatureNetworkError(f"classifier file {where}: spec and state_dict must be dicts")
    return payload


def load_classifier(
    source: PathOrBuffer | bytes, device: str | torch.device = "cpu"
) -> ClassifierFeatures:
    """The :class:`ClassifierFeatures` of a file written by :func:`save_classifier`.

    ``source``: a path, a readable binary file object, or the file's bytes.

    Raises:
        FeatureNetworkError: naming the file, when it is missing, truncated or not a torch
            file, has another format tag, lacks keys, holds an invalid spec, or a state dict
            with missing, unexpected or wrongly shaped entries.
    """
    where = _where(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    payload = _read_payload(source, where)
    try:
        spec = ClassifierSpec.from_dict(payload["spec"])
    except ValueError as exc:
        raise FeatureNetworkError(f"classifier file {where} holds an invalid spec: {exc}") from None
    model = SmallClassifier(spec)
    state = payload["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise FeatureNetworkError(
            f"classifier file {where}: state dict does not fit spec {spec}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        want = expected[name]
        if not isinstance(tensor, Tensor) or tensor.shape != want.shape:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise FeatureNetworkError(
                f"classifier file {where}: {name} has shape {got}, "
                f"spec {spec} needs {tuple(want.shape)}"
            )
    model.load_state_dict(state)
    return ClassifierFeatures(model, spec, device=device)
