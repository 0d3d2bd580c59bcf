"""Checkpoints: a model with its config, shared by training (resume) and sampling (inference).

A checkpoint is a directory of three files::

    model.pt     torch.save of {"model", "ema", "optimizer", "rng", "format"}:
                 network state, EMA state, AdamW state, torch RNG states (one per rank)
    state.json   progress: images_seen, step, data_epoch, mlflow_run_id, manifest_hash,
                 val_loss, data_shape, world_size (see :class:`TrainState`)
    config.yaml  the resolved :class:`~pipeline.config.Config` the run was trained with

Model states are saved from the bare network (never a DDP or torch.compile wrapper), so a
checkpoint loads into a plain :func:`~pipeline.models.build_model` network. Loading always
uses ``torch.load(..., weights_only=True)``: a checkpoint is data, never code, so a
tampered file cannot run anything. A checkpoint whose tensors do not fit the network that
its own config describes raises :class:`CheckpointError` (a ValueError) naming the
checkpoint and the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pipeline.config import Config, ConfigError, build_config
from pipeline.models import bare_module, build_model  # bare_module: re-exported

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "MODEL_FILE",
    "STATE_FILE",
    "CheckpointError",
    "LoadedCheckpoint",
    "TrainState",
    "bare_module",
    "data_shape_of",
    "load_checkpoint",
    "load_for_inference",
    "load_state_into",
    "read_state",
    "rng_state",
    "save_checkpoint",
    "saved_config",
    "set_rng_state",
]

MODEL_FILE = "model.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
FORMAT = "fmpipe-checkpoint/1"
_MAX_KEYS_SHOWN = 8


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the network; names the directory."""


@dataclass
class TrainState:
    """Progress saved beside the weights (``state.json``)."""

    images_seen: int = 0  # images the optimizer has consumed (global, all workers)
    step: int = 0  # optimizer steps taken
    data_epoch: int = 0  # data epoch the stream was in; a re-run restarts the stream there
    mlflow_run_id: str | None = None  # the MLflow run to continue on resume
    manifest_hash: str = ""  # Manifest.content_hash() of the training split
    val_loss: float | None = None  # last validation loss (EMA weights, fixed draws)
    data_shape: list[int] = field(default_factory=list)  # (C, H, W) of one sample
    world_size: int = 1  # workers that trained up to here (RNG states are per rank)
    class_names: list[str] = field(default_factory=list)  # label id -> the dataset's name
    # name -> size of the other files of the checkpoint, written after them: a directory
    # whose files do not match is an interrupted upload (pipeline.train.resume)
    files: dict[str, int] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        body = asdict(self)
        if body["val_loss"] is not None and not math.isfinite(body["val_loss"]):
            body["val_loss"] = None  # JSON has no NaN/inf
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> TrainState:
        try:
            body = json.loads(text)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in body.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {where}: {STATE_FILE} is not valid: {exc}") from None


@dataclass
class LoadedCheckpoint:
    """Everything in a checkpoint directory, as plain tensors and dicts (nothing applied)."""

    directory: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    rng: list[dict[str, Any]]  # one entry per rank: {"torch": ByteTensor, "cuda": [...]}
    state: TrainState
    config: Config


def data_shape_of(cfg: Config) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images ``cfg`` trains on: data.channels x data.resolution^2."""
    return (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in bare_module(module).state_dict().items()}


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    model: nn.Module,
    state: TrainState,
    config: Config | Mapping[str, Any],
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``model.pt``, ``state.json`` and ``config.yaml`` into ``directory`` (created).

    ``rng`` holds one RNG-state dict per rank (see :func:`rng_state`); None saves this
    process's state as rank 0's. Files are written under temporary names and renamed, so a
    crash never leaves a half-written file under a final name.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = config.to_dict() if isinstance(config, Config) else dict(config)
    payload = {
        "format": FORMAT,
        "model": _cpu_state(model),
        "ema": _cpu_state(ema) if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng if rng is not None else [rng_state()],
    }
    _atomic(out / MODEL_FILE, lambda tmp: torch.save(payload, tmp))
    text = yaml.safe_dump(cfg_dict, sort_keys=False)
    _atomic(out / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    # state.json last, listing the others' sizes: it is what makes the directory complete
    sizes = {name: (out / name).stat().st_size for name in (MODEL_FILE, CONFIG_FILE)}
    saved = replace(state, files=sizes)
    _atomic(out / STATE_FILE, lambda tmp: tmp.write_text(saved.to_json()))
    return out


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU, and every CUDA device when available)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(saved: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only if the device count fits)."""
    torch.set_rng_state(saved["torch"])
    cuda = list(saved.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def read_state(directory: str | os.PathLike[str]) -> TrainState:
    """Only ``state.json`` (cheap: no tensors are read)."""
    d = Path(directory)
    path = d / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {d}: {STATE_FILE} is missing")
    return TrainState.from_json(path.read_text(), str(d))


def saved_config(tree: Mapping[str, Any]) -> Config:
    """A checkpoint's ``config.yaml`` tree as a Config.

    Saved trees are whole dumps, so a setting missing from a saved ``train`` section predates
    it; where a later default would change what that run was, it reads as the value the run
    had: ``train.distill_states`` (new default ``unrolled``) as ``pair_path``, so a student
    saved before it is neither resumed nor tagged as an unrolled one.
    """
    train = tree.get("train")
    if isinstance(train, Mapping) and "distill_states" not in train:
        tree = {**tree, "train": {**train, "distill_states": "pair_path"}}
    return build_config(dict(tree))


def _read_config(d: Path) -> Config:
    path = d / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {d}: {CONFIG_FILE} is missing")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
        return saved_config(tree)
    except (yaml.YAMLError, ConfigError) as exc:
        raise CheckpointError(
            f"checkpoint {d}: {CONFIG_FILE} is not a valid config: {exc}"
        ) from None


def load_checkpoint(
    directory: str | os.PathLike[str], map_location: str = "cpu"
) -> LoadedCheckpoint:
    """Read a checkpoint directory (``weights_only=True``); applies nothing.

    Raises:
        CheckpointError: a file is missing or unreadable, or the format is unknown.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} does not exist or is not a directory")
    missing = [n for n in (MODEL_FILE, STATE_FILE, CONFIG_FILE) if not (d / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {d} is incomplete: missing {', '.join(missing)}")
    try:
        payload = torch.load(d / MODEL_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, refused globals
        raise CheckpointError(
            f"checkpoint {d}: cannot read {MODEL_FILE} (weights only): {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {d}: {MODEL_FILE} is not {FORMAT} (found {found!r})")
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"checkpoint {d}: {MODEL_FILE} holds no model state")
    return LoadedCheckpoint(
        directory=d,
        model=payload["model"],
        ema=payload.get("ema"),
        optimizer=payload.get("optimizer"),
        rng=list(payload.get("rng") or []),
        state=read_state(d),
        config=_read_config(d),
    )


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Describe how ``state`` fails to fit ``module`` ("" when it fits)."""
    own = bare_module(module).state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, network {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatch", shapes)):  # fmt: skip
        if keys:
            shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
            more = (
                f", ... ({len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
            )
            parts.append(f"{label}: {shown}{more}")
    return "; ".join(parts)


def load_state_into(
    module: nn.Module, state: Mapping[str, torch.Tensor], where: str, what: str = "model"
) -> None:
    """``load_state_dict`` strictly, or raise CheckpointError naming ``where`` and the keys."""
    problem = _mismatch(module, state)
    if problem:
        raise CheckpointError(
            f"checkpoint {where}: {what} state does not fit the network: {problem}"
        )
    bare_module(module).load_state_dict(dict(state), strict=True)


def load_for_inference(
    directory: str | os.PathLike[str], *, use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Config]:
    """The network of a checkpoint with its EMA weights (or raw weights), in eval mode.

    Returns ``(model, config)``; the model is built from the checkpoint's own config and
    data shape, moved to ``device``, with ``requires_grad`` off.

    Raises:
        CheckpointError: files missing/unreadable, or weights that do not fit the network.
    """
    ckpt = load_checkpoint(directory)
    shape = tuple(ckpt.state.data_shape) or data_shape_of(ckpt.config)
    model = build_model(ckpt.config.model, shape)
    weights = ckpt.ema if use_ema and ckpt.ema is not None else ckpt.model
    load_state_into(model, weights, str(ckpt.directory), "EMA" if weights is ckpt.ema else "model")
    model.to(device).eval().requires_grad_(False)
    return model, ckpt.config
