"""Where the sampler's network comes from: the MLflow registry, a checkpoint, or a factory.

``sample.model`` is one of

- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: resolved in the MLflow registry
  (:func:`pipeline.registry.resolve_model_uri`), whose version points at a checkpoint
  directory logged by training; it is downloaded to a local cache;
- a checkpoint directory: a local path, or ``s3://bucket/prefix/checkpoint_...`` (copied to a
  temporary directory first).

The checkpoint's own config describes the network (the model's config travels with it), its
EMA weights are loaded (``sample.use_ema``) and checked against that network on the driver,
so a checkpoint that does not fit fails before any Ray work starts, with the keys named.

Actors never read the checkpoint themselves: :class:`ModelSource` carries a picklable
:class:`CheckpointBuilder` whose weights sit in the Ray object store (``ray.put``), so actors
on any node build the same network from the same bytes. Tests (and other callers) can hand
:func:`pipeline.sample.generate` any picklable zero-argument factory instead, e.g.
``functools.partial(GaussianVelocity, mu, sigma)``.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    load_for_inference,
    read_state,
)
from pipeline.config import Config, ModelConfig
from pipeline.models import build_model

__all__ = [
    "CheckpointBuilder",
    "ModelSource",
    "load_model_source",
    "training_data_section",
    "training_data_uri",
    "weights_digest",
]


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class CheckpointBuilder:
    """Picklable recipe for the network: its config, data shape and (a reference to) weights.

    ``weights`` is a state dict or a Ray ``ObjectRef`` to one (fetched with ``ray.get``).
    """

    model: dict[str, Any]  # the checkpoint's ``model`` config section
    data_shape: tuple[int, ...]
    weights: Any

    def __call__(self) -> nn.Module:
        weights = self.weights
        if not isinstance(weights, Mapping):
            import ray

            weights = ray.get(weights)
        network = build_model(ModelConfig.model_validate(self.model), self.data_shape)
        network.load_state_dict(dict(weights), strict=True)
        return network


@dataclass
class ModelSource:
    """The network to sample from, with what the outputs and MLflow should say about it."""

    factory: Callable[[], nn.Module]  # picklable; builds the network in an actor
    data_shape: tuple[int, ...]  # (C, H, W) of one sample
    num_classes: int = 0  # > 0: class-conditional (null class = num_classes for CFG)
    uri: str = ""  # what the user asked for (models:/..., a checkpoint URI, or a label)
    name: str | None = None  # registered model name
    version: str | None = None  # registered model version
    alias: str | None = None  # registry alias used, if any
    train_run_id: str | None = None  # MLflow run that trained it
    digest: str = ""  # weights_digest of the weights used (identifies the model on resume)
    checkpoint: str = ""  # where the checkpoint was read from (local directory or URI)
    tags: dict[str, str] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()  # label id -> name, from the checkpoint's state

    @property
    def label(self) -> str:
        """Short human name: ``digits v3`` or the URI."""
        if self.name:
            return f"{self.name} v{self.version}" if self.version else self.name
        return self.uri

    def describe(self) -> dict[str, Any]:
        return {
            "model_uri": self.uri,
            "model_name": self.name,
            "model_version": self.version,
            "model_alias": self.alias,
            "model_digest": self.digest,
            "train_run_id": self.train_run_id,
        }

    @classmethod
    def from_factory(
        cls,
        factory: Callable[[], nn.Module],
        data_shape: tuple[int, ...],
        *,
        uri: str = "factory",
        num_classes: int | None = None,
        version: str | None = None,
    ) -> ModelSource:
        """Wrap a picklable factory; builds the network once here for its digest and classes."""
        network = factory()
        found = int(getattr(network, "num_classes", 0) or 0)
        return cls(
            factory=factory,
            data_shape=tuple(int(s) for s in data_shape),
            num_classes=found if num_classes is None else int(num_classes),
            uri=uri,
            version=version,
            digest=weights_digest(network.state_dict()),
        )


def download_checkpoint(uri: str, cfg: Config, into: Path) -> Path:
    """Copy the three checkpoint files under the storage URI ``uri`` into ``into``."""
    from pipeline.storage import StorageError, resolve

    location = resolve(uri, cfg.storage)
    names = set(location.list_names())
    missing = [n for n in (MODEL_FILE, STATE_FILE, CONFIG_FILE) if n not in names]
    if missing:
        if not names:
            raise CheckpointError(f"checkpoint {location.uri} does not exist (no files there)")
        raise CheckpointError(
            f"checkpoint {location.uri} is incomplete: missing {', '.join(missing)}"
        )
    into.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE):
        try:
            (into / name).write_bytes(location.child(name).read_bytes())
        except StorageError as exc:
            raise CheckpointError(f"checkpoint {location.uri}: cannot read {name}: {exc}") from None
    return into


def _from_checkpoint_dir(
    directory: Path, use_ema: bool
) -> tuple[CheckpointBuilder, int, str, str | None, tuple[str, ...]]:
    network, ckpt_cfg = load_for_inference(directory, use_ema=use_ema)  # checks the fit
    state = read_state(directory)
    shape = tuple(int(s) for s in state.data_shape) or (
        ckpt_cfg.data.channels,
        ckpt_cfg.data.resolution,
        ckpt_cfg.data.resolution,
    )
    weights = {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()}
    builder = CheckpointBuilder(
        model=ckpt_cfg.model.model_dump(mode="json"), data_shape=shape, weights=weights
    )
    names = tuple(state.class_names)
    digest = weights_digest(weights)
    return builder, int(ckpt_cfg.model.num_classes), digest, state.mlflow_run_id, names


def load_model_source(cfg: Config, uri: str | None = None) -> ModelSource:
    """Resolve ``uri`` (default ``cfg.sample.model``) into a :class:`ModelSource`.

    Raises:
        ValueError: no model given.
        pipeline.registry.ModelNotFound: a registry model, alias or version does not exist.
        pipeline.checkpoint.CheckpointError: files missing or weights that do not fit.
        pipeline.storage.StorageError: an s3:// checkpoint cannot be read.
    """
    uri = (uri if uri is not None else cfg.sample.model).strip()
    if not uri:
        raise ValueError(
            "no model to sample from: set --model (sample.model) to models:/<name>@<alias>, "
            "models:/<name>/<version> or a checkpoint directory"
        )
    use_ema = cfg.sample.use_ema
    if uri.startswith(("models:/", "runs:/")):
        from pipeline.registry import resolve_model_uri

        resolved = resolve_model_uri(uri, cfg)
        directory = Path(resolved.checkpoint_uri)
        builder, classes, digest, ckpt_run, names = _from_checkpoint_dir(directory, use_ema)
        return ModelSource(
            factory=builder,
            data_shape=builder.data_shape,
            num_classes=classes,
            uri=uri,
            name=resolved.name,
            version=resolved.version,
            alias=resolved.alias,
            train_run_id=resolved.run_id or ckpt_run,
            digest=digest,
            checkpoint=resolved.source or str(directory),
            tags=dict(resolved.tags),
            class_names=names,
        )
    if uri.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="fmpipe-ckpt-") as tmp:
            directory = download_checkpoint(uri, cfg, Path(tmp))
            builder, classes, digest, ckpt_run, names = _from_checkpoint_dir(directory, use_ema)
    else:
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        directory = Path(path).expanduser()
        if not directory.exists():
            raise CheckpointError(
                f"model '{uri}' is neither models:/<name>@<alias>, models:/<name>/<version> nor "
                "an existing checkpoint directory"
            )
        builder, classes, digest, ckpt_run, names = _from_checkpoint_dir(directory, use_ema)
    return ModelSource(
        factory=builder,
        data_shape=builder.data_shape,
        num_classes=classes,
        uri=uri,
        train_run_id=ckpt_run,
        digest=digest,
        checkpoint=uri,
        class_names=names,
    )


SOLVER_TAG, STEPS_TAG = "fmpipe.sample.solver", "fmpipe.sample.steps"


def model_sampling_rule(cfg: Config, uri: str) -> tuple[str, int] | None:
    """The ``(solver, steps)`` a registered version says it is meant for (its tags
    ``fmpipe.sample.solver`` / ``fmpipe.sample.steps``, e.g. a k-step distilled student), or
    None: not a registry URI, or no such tags. Reads the registry only (no download).

    Raises:
        pipeline.registry.ModelNotFound: the model, alias or version does not exist.
    """
    if not uri.startswith("models:/"):
        return None
    from pipeline.registry import lookup_version, parse_models_uri, registry_client
    from pipeline.tracking import tracking_uri

    server = tracking_uri(cfg)
    name, alias, version = parse_models_uri(uri)
    tags = dict(lookup_version(registry_client(server), name, alias, version, where=server).tags)
    return sampling_rule_from_tags(tags)


def sampling_rule_from_tags(tags: dict[str, str]) -> tuple[str, int] | None:
    """``(solver, steps)`` from a version's ``fmpipe.sample.*`` tags, or None (absent or not
    a number)."""
    try:
        return tags[SOLVER_TAG], int(tags[STEPS_TAG])
    except (KeyError, ValueError):
        return None


def training_data_section(cfg: Config, uri: str) -> dict[str, Any]:
    """The ``data`` section of the checkpoint's own config (``{}`` when it has none)."""
    import yaml

    from pipeline.checkpoint import CONFIG_FILE
    from pipeline.storage import resolve

    where = uri
    if uri.startswith(("models:/", "runs:/")):
        from pipeline.registry import resolve_model_uri

        where = resolve_model_uri(uri, cfg).checkpoint_uri  # the cached download
    elif uri.startswith("file://"):
        where = uri[len("file://") :]
    tree = yaml.safe_load(resolve(where, cfg.storage).child(CONFIG_FILE).read_bytes()) or {}
    return dict(tree.get("data") or {})


def training_data_uri(cfg: Config, uri: str) -> str:
    """``data.uri`` in the checkpoint's own config ("" when it has none)."""
    return str(training_data_section(cfg, uri).get("uri") or "")
