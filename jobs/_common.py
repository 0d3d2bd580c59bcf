"""Argument handling shared by the job entry points: --config FILE plus key.path=value."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, load_config
from pipeline.redact import redacted_console, scrub


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see jobs/configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="config overrides applied last, e.g. train.lr=1e-3 data.batch_size=64",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


def overrides_from(pairs: dict[str, Any]) -> list[str]:
    """``{"train.lr": 1e-3, "data.uri": None}`` -> ``["train.lr=0.001"]`` (None: flag not given)."""
    return [f"{key}={json.dumps(value)}" for key, value in pairs.items() if value is not None]


def packaged_defaults(name: str) -> dict[str, Any]:
    """The embedded defaults ``jobs/configs/<name>.yaml`` as a dict."""
    text = resources.files("jobs").joinpath("configs", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def resolve_config(
    args: argparse.Namespace, defaults: str | None = None, extra: list[str] | None = None
) -> Config:
    """defaults file < --config < flag shortcuts (``extra``) < positional overrides."""
    base = packaged_defaults(defaults) if defaults else None
    path = Path(args.config) if args.config else None
    return load_config(path, [*(extra or []), *args.overrides], defaults=base)


def run_guarded(
    job: str,
    action: Callable[[], object],
    user_errors: tuple[type[BaseException], ...],
    resume_hint: str,
    failures: Mapping[type[BaseException], Callable[[BaseException], str]] | None = None,
) -> int:
    """Run a job's main action: a user error is one scrubbed line and exit 1, Ctrl-C says how
    to resume and exits 130; config errors pass through to :func:`run_job` (exit 2).

    ``failures`` words other exception types itself: ``fmpipe <job>: <message>``, scrubbed,
    exit 1 (the first type in the mapping that matches)."""
    failures = failures or {}
    try:
        action()
    except ConfigError:
        raise
    except user_errors as exc:
        print(f"fmpipe {job}: error: {scrub(str(exc))}", file=sys.stderr)
        return 1
    except tuple(failures) as exc:
        message = next(word for kind, word in failures.items() if isinstance(exc, kind))
        print(f"fmpipe {job}: {scrub(message(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fmpipe {job}: interrupted; {resume_hint}", file=sys.stderr)
        return 130
    return 0


def run_job(body: Callable[[], int]) -> int:
    """Run a job body; turn config errors into one clear line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # MLflow re-sets its logger's level on import: tell it through its own variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for chatty in ("botocore", "boto3", "urllib3", "s3transfer", "ray", "mlflow", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # their detail stays in Ray's logs
    with redacted_console():  # every line the job prints or logs is scrubbed
        try:
            return body()
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
