"""The embedded home, ``$FMPIPE_HOME`` or ``./.fmpipe``: where every empty path setting points.

A path setting left empty means a place under the home; this module is the one place that
says which. Layout::

    <home>/store/<dataset>        datasets written by `fmpipe prepare` (digits by default)
    <home>/store/samples/<model>  sample shards of `fmpipe sample`
    <home>/runs/<run_name>        Ray Train storage: checkpoints, fmpipe_run.json
    <home>/mlflow.db              the embedded MLflow tracking store (sqlite)
    <home>/mlartifacts/           its artifacts
    <home>/samples/<out>-<hash>/  local copies of sample grids
    <home>/cache/models/<hash>/   registry downloads, reused while the version is unchanged
    <home>/indexes/<hash>.json    `fmpipe index` of a dataset fmpipe did not write
    <home>/toy/                   the 2-D example's plot and model
    <home>/stack/                 `fmpipe stack`: S3 data, MLflow db, logs, state
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import Config

__all__ = [
    "DEFAULT_DATASET",
    "data_uri",
    "embedded_tracking_uri",
    "fmpipe_home",
    "index_uri",
    "model_cache_dir",
    "prepare_out",
    "sample_grid_path",
    "sample_out",
    "stack_home",
    "storage_path",
    "store_uri",
    "toy_dir",
]

DEFAULT_DATASET = "digits"  # what `fmpipe train` reads when data.uri is empty


def fmpipe_home() -> Path:
    """Root of the embedded defaults: ``$FMPIPE_HOME`` or ``./.fmpipe`` (absolute)."""
    return Path(os.environ.get("FMPIPE_HOME", ".fmpipe")).absolute()


def store_uri(name: str) -> str:
    """``<home>/store/<name>``: the embedded object store is a local directory."""
    return str(fmpipe_home() / "store" / name)


def data_uri(cfg: Config) -> str:
    """``data.uri``, else the dataset ``fmpipe prepare --source digits`` writes by default."""
    return cfg.data.uri.strip() or store_uri(DEFAULT_DATASET)


def prepare_out(cfg: Config, dataset_name: str) -> str:
    """``prepare.out``, else ``<home>/store/<dataset_name>``."""
    return cfg.prepare.out.strip() or store_uri(dataset_name)


def storage_path(cfg: Config) -> str:
    """``train.storage_path``, else ``<home>/runs``."""
    return cfg.train.storage_path.strip() or str(fmpipe_home() / "runs")


def sample_out(cfg: Config, model_name: str) -> str:
    """``sample.out``, else ``<home>/store/samples/<model name>``."""
    return cfg.sample.out.strip() or store_uri(f"samples/{model_name or 'model'}")


def sample_grid_path(out_uri: str) -> Path:
    """``<home>/samples/<last part of out>-<hash of out>/grid.png``: one per output."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", out_uri.rstrip("/").rsplit("/", 1)[-1]).strip("._")
    digest = hashlib.sha256(out_uri.encode()).hexdigest()[:8]
    return fmpipe_home() / "samples" / f"{base or 'samples'}-{digest}" / "grid.png"


def toy_dir(cfg: Config) -> Path:
    """``toy.out``, else ``<home>/toy``."""
    return Path(cfg.toy.out) if cfg.toy.out.strip() else fmpipe_home() / "toy"


def embedded_tracking_uri() -> str:
    """``sqlite:///<home>/mlflow.db``; creates the home directory."""
    home = fmpipe_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def index_uri(cfg: Config, address: str) -> str:
    """``data.index_uri``, else ``<home>/indexes/<sha256(address)[:16]>.json``.

    ``address``: the dataset address in its canonical form
    (:func:`pipeline.data.address.address_text`), so one dataset has one index.
    """
    digest = hashlib.sha256(address.encode()).hexdigest()[:16]
    return cfg.data.index_uri.strip() or str(fmpipe_home() / "indexes" / f"{digest}.json")


def model_cache_dir(digest: str) -> Path:
    """``<home>/cache/models/<digest>``: one registry download."""
    return fmpipe_home() / "cache" / "models" / digest


def stack_home(explicit: str | None = None) -> Path:
    """The local stack's home: ``--home DIR``, else the embedded home."""
    return Path(explicit).absolute() if explicit else fmpipe_home()
