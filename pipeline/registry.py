"""The MLflow model registry, read side: the one place fmpipe looks models up.

Sampling (``fmpipe sample --model models:/digits@champion``), retraining (which version does
the ``champion`` alias point at, which version did this run register) and the benchmarks all
ask the registry the same few questions; each has one implementation here:

- :func:`registered_model`, :func:`alias_version`, :func:`read_champion`: a model and where
  an alias points (None when either is missing: retraining treats that as "no champion");
- :func:`model_versions`, :func:`find_version`: a model's versions, oldest first, and the
  version a run registered from an artifact directory (a re-run after a crash);
- :func:`describe_model`: ``versions: 1, 2; aliases: champion -> version 2``, for errors;
- :func:`resolve_model_uri`: ``models:/<name>@<alias>``, ``models:/<name>/<version>``
  (or ``/latest``), ``runs:/<run_id>/<path>`` or a checkpoint URI -> a local checkpoint
  directory, downloads cached under ``$FMPIPE_HOME/cache/models``.

A reference that names a model, alias, version or run that does not exist raises
:class:`ModelNotFound`: one line naming the model and what does exist. Version numbers are
strings everywhere here: MLflow's REST client returns them as strings but its sqlite store
(the embedded default) as ints, and joining ints into a message once raised ``TypeError``.

Writes (creating versions, moving aliases) stay with :class:`pipeline.tracking.Tracker` and
the retrain promotion, which need a run or a lease. Every function that talks to MLflow
imports it lazily (~2 s), so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import Config
from pipeline.home import model_cache_dir
from pipeline.redact import scrub
from pipeline.tracking import check_reachable, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

__all__ = [
    "Champion",
    "ModelNotFound",
    "ResolvedModel",
    "alias_version",
    "describe_model",
    "find_version",
    "lookup_version",
    "model_aliases",
    "model_versions",
    "parse_models_uri",
    "read_champion",
    "registered_model",
    "registered_names",
    "registry_client",
    "resolve_model_uri",
]

MODELS_SCHEME = "models:/"
RUNS_SCHEME = "runs:/"
_COMPLETE = ".fmpipe-complete"  # marker of a finished cache entry (holds its source URI)
_NAMES_SHOWN = 50  # registered model names listed in a "does not exist" message


class ModelNotFound(ValueError):
    """A ``models:/`` or ``runs:/`` URI names a model, alias, version or run that is not there.

    The message is one line that names the model and lists what exists, so the CLI can print
    it as the whole error.
    """


@dataclass
class ResolvedModel:
    """What a model URI points at. ``checkpoint_uri`` is readable by a checkpoint loader."""

    checkpoint_uri: str  # local directory (registry: downloaded) or the storage URI as given
    name: str | None = None  # registered model name (registry URIs)
    version: str | None = None  # registered model version (registry URIs)
    run_id: str | None = None  # the run that logged it (registry and runs:/ URIs)
    alias: str | None = None  # the alias used, for models:/<name>@<alias>
    source: str | None = None  # the artifact location the files were downloaded from
    tags: dict[str, str] = field(default_factory=dict)  # model version tags


@dataclass
class Champion:
    """The version an alias (``retrain.alias``, usually ``champion``) points at."""

    version: str
    manifest_hash: str  # the version's manifest_hash tag: the data it was trained on ("")
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the client


def registry_client(cfg_or_uri: Config | str) -> MlflowClient:
    """An ``MlflowClient`` whose tracking and registry URIs are both fmpipe's tracking URI.

    ``cfg_or_uri``: a config (the URI comes from :func:`pipeline.tracking.tracking_uri`) or
    a tracking URI already resolved.
    """
    from mlflow import MlflowClient

    uri = cfg_or_uri if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _missing(exc: BaseException) -> bool:
    """True when an ``MlflowException`` says the thing asked for does not exist."""
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", ""))


def _quoted(value: str) -> str:
    """``value`` as a single-quoted string literal of MLflow's search filter syntax."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------- lookups


def registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    """The registered model ``name``, or None when the registry has no such model."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise


def model_aliases(model: RegisteredModel | None) -> dict[str, str]:
    """``{alias: version}`` of a registered model, versions as strings ({} for None)."""
    if model is None:
        return {}
    return {str(a): str(v) for a, v in dict(getattr(model, "aliases", None) or {}).items()}


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` of model ``name`` points at; None when the model or alias is unset."""
    return model_aliases(registered_model(client, name)).get(alias)


def model_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of model ``name``, oldest (lowest number) first; [] when it has none."""
    found = client.search_model_versions(f"name = {_quoted(name)}")
    return sorted(found, key=lambda mv: int(mv.version))


def find_version(client: MlflowClient, name: str, run_id: str, artifact_path: str) -> str | None:
    """The version of ``name`` that run ``run_id`` registered from ``artifact_path``, if any.

    A retrain that crashed after registering finds its version again instead of registering
    the same checkpoint twice.
    """
    artifact_path = artifact_path.strip("/")
    for mv in model_versions(client, name):
        if mv.run_id == run_id and str(mv.source or "").rstrip("/").endswith(artifact_path):
            return str(mv.version)
    return None


def read_champion(client: MlflowClient, name: str, alias: str) -> Champion | None:
    """The version ``alias`` points at, with its ``manifest_hash`` tag; None when unset."""
    version = alias_version(client, name, alias)
    if version is None:
        return None
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags or {})
    return Champion(str(mv.version), tags.get("manifest_hash", ""), mv.run_id or None, tags)


def describe_model(
    client: MlflowClient, name: str, aliases: Mapping[str, Any] | None = None
) -> str:
    """``versions: 1, 2; aliases: champion -> version 2`` (``none`` for empty parts).

    ``aliases``: the model's aliases when the caller already has them (else read here).
    """
    if aliases is None:
        aliases = model_aliases(registered_model(client, name))
    versions = [str(mv.version) for mv in model_versions(client, name)]
    shown = ", ".join(f"{a} -> version {v}" for a, v in sorted(aliases.items()))
    return f"versions: {', '.join(versions) or 'none'}; aliases: {shown or 'none'}"


def registered_names(client: MlflowClient, limit: int = _NAMES_SHOWN) -> list[str]:
    """Up to ``limit`` registered model names, sorted ([] if the registry cannot be listed)."""
    try:
        return sorted(rm.name for rm in client.search_registered_models(max_results=limit))
    except Exception:  # only ever used inside an error message: never hide the real error
        return []


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3").

    ``models:/name/latest`` -> (name, None, "latest").

    Raises:
        ValueError: ``uri`` is none of those forms (the message shows the forms).
    """
    rest = uri[len(MODELS_SCHEME) :].strip("/") if uri.startswith(MODELS_SCHEME) else ""
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in name:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and "/" not in name and (version.isdigit() or version == "latest"):
            return name, None, version
    raise ValueError(
        f"model URI '{uri}' is not models:/<name>@<alias>, models:/<name>/<version> or "
        "models:/<name>/latest"
    )


def lookup_version(
    client: MlflowClient, name: str, alias: str | None, version: str | None, *, where: str = ""
) -> ModelVersion:
    """The version of ``name`` that ``alias`` points at, or number ``version`` (or "latest").

    ``where``: the tracking URI, named (scrubbed) in the error when the model is missing.

    Raises:
        ModelNotFound: no such model, alias or version; one line naming what exists.
    """
    from mlflow.exceptions import MlflowException

    model = registered_model(client, name)
    wanted = f"{MODELS_SCHEME}{name}{'@' + alias if alias else '/' + str(version)}"
    if model is None:
        names = registered_names(client)
        at = f" at {scrub(where)}" if where else ""
        raise ModelNotFound(
            f"registered model '{name}' does not exist{at} (resolving '{wanted}'); "
            f"registered models: {', '.join(names) or 'none'}"
        )
    aliases = model_aliases(model)
    if alias is not None:
        if alias not in aliases:
            raise ModelNotFound(
                f"registered model '{name}' has no alias '{alias}'; "
                f"{describe_model(client, name, aliases)}"
            )
        version = aliases[alias]
    elif version == "latest":
        versions = model_versions(client, name)
        if not versions:
            raise ModelNotFound(f"registered model '{name}' has no versions (resolving '{wanted}')")
        return versions[-1]
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _missing(exc):
            raise
        raise ModelNotFound(
            f"registered model '{name}' has no version {version}; "
            f"{describe_model(client, name, aliases)}"
        ) from None


# --------------------------------------------------------------------------- downloads


def _fetch(uri: str, source: str, into: Path) -> None:
    """Download the directory ``source`` (artifact URI or runs:/) so its files land in ``into``."""
    import mlflow.artifacts

    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fmpipe-dl-", dir=into.parent) as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)
        )
        if local.is_file():
            raise ValueError(f"model source '{source}' is a file, expected a directory")
        for child in local.iterdir():  # download_artifacts nests the directory under its name
            target = into / child.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            child.rename(target)


def _download_cached(uri: str, source: str, dst: Path, *, reuse: bool) -> Path:
    """``source`` downloaded to the cache entry ``dst``, which appears only when complete.

    ``reuse``: keep an existing complete entry of the same source (immutable registry
    versions); otherwise download again and swap the entry (run artifacts can change).
    """
    marker = dst / _COMPLETE
    if reuse and marker.is_file() and marker.read_text().strip() == source:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        _fetch(uri, source, tmp)
        (tmp / marker.name).write_text(source + "\n")
        if dst.exists():
            old = dst.with_name(f".{dst.name}-old-{os.getpid()}-{time.monotonic_ns()}")
            with contextlib.suppress(OSError):
                dst.rename(old)
                shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(dst)
        except OSError:  # another process put a complete entry there first
            if not marker.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _cache_root(uri: str) -> Path:
    """The download cache of one tracking server: ``$FMPIPE_HOME/cache/models/<hash>``."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return model_cache_dir(digest)


def _resolve_run(
    client: MlflowClient, server: str, uri: str, dst_dir: Path | None
) -> ResolvedModel:
    """``runs:/<run_id>/<path>``: those run artifacts, downloaded (not reused: they can change)."""
    from mlflow.exceptions import MlflowException

    rest = uri[len(RUNS_SCHEME) :].strip("/")
    run_id = rest.partition("/")[0]
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ModelNotFound(f"MLflow run '{run_id}' does not exist at {scrub(server)}") from None
    if dst_dir is not None:
        local = dst_dir
        _fetch(server, uri, local)
    else:
        key = hashlib.sha256(rest.encode()).hexdigest()[:16]
        local = _download_cached(server, uri, _cache_root(server) / "runs" / key, reuse=False)
    return ResolvedModel(checkpoint_uri=str(local), run_id=run_id, source=uri)


def resolve_model_uri(
    uri: str, cfg: Config, *, dst_dir: str | os.PathLike[str] | None = None
) -> ResolvedModel:
    """Turn a model reference into something a checkpoint loader can read.

    - ``models:/<name>@<alias>``, ``models:/<name>/<version>`` (or ``/latest``): looked up in
      the registry at :func:`pipeline.tracking.tracking_uri`, the version's artifacts
      downloaded to ``dst_dir`` (default: a cache under ``$FMPIPE_HOME/cache/models``, reused
      when already complete: a registered version does not change).
    - ``runs:/<run_id>/<path>``: those run artifacts, downloaded the same way (not reused).
    - anything else: a checkpoint URI (``s3://...`` or a path), returned as is.

    Raises:
        ModelNotFound: a missing model, alias, version or run (one line naming what exists).
        ValueError: a ``models:/`` URI of none of the forms above.
    """
    uri = str(uri).strip()
    if not uri.startswith((MODELS_SCHEME, RUNS_SCHEME)):
        return ResolvedModel(checkpoint_uri=uri)
    server = tracking_uri(cfg)
    client = registry_client(server)
    into = Path(dst_dir) if dst_dir else None
    if uri.startswith(RUNS_SCHEME):
        return _resolve_run(client, server, uri, into)

    name, alias, version = parse_models_uri(uri)
    mv = lookup_version(client, name, alias, version, where=server)
    source = client.get_model_version_download_uri(name, str(mv.version))
    if into is not None:
        local = into
        _fetch(server, source, local)
    else:  # key on creation time + run too: a deleted and re-created model reuses numbers
        stamp = f"{mv.version}-{mv.creation_timestamp}-{(mv.run_id or 'norun')[:12]}"
        entry = _cache_root(server) / re.sub(r"[^A-Za-z0-9._-]+", "_", name) / stamp
        local = _download_cached(server, source, entry, reuse=True)
    return ResolvedModel(
        checkpoint_uri=str(local),
        name=name,
        version=str(mv.version),
        run_id=mv.run_id or None,
        alias=alias,
        source=source,
        tags=dict(mv.tags or {}),
    )
