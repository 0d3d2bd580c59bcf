"""Argument handling shared by the job entry points: --config FILE, flag shortcuts for the
most used keys, and ``key.path=value`` overrides anywhere on the command line.

Precedence, lowest first: pipeline/config.py's defaults < the job's packaged YAML
(jobs/configs/<job>.yaml) < --config FILE < flag shortcuts and overrides. A flag shortcut
and an override of the same key on one command line is an error naming both: the two are
on an equal footing, so picking one silently would hide a mistake that costs a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, load_config, merge_trees, parse_override
from pipeline.rayenv import quiet_library_loggers
from pipeline.redact import redacted_console, scrub

# ``seed=3``, ``train.lr=1e-3``: a dotted key of identifiers, then ``=``. A token of this form
# that argparse did not take as a flag's value is an override, wherever it stands.
_OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see jobs/configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="config overrides, before, between or after the flags, e.g. train.lr=1e-3 "
        "data.batch_size=64 (a flag and an override of the same key is an error)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


def is_override(token: str) -> bool:
    """Whether ``token`` has the form ``key.path=value`` (the value may be anything)."""
    return _OVERRIDE.match(token) is not None


def parse_job_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse a job's command line, taking ``key.path=value`` overrides anywhere among the flags.

    argparse gives a ``nargs="*"`` positional one run of tokens only: in
    ``--images 2000 train.lr=1 --workers 2 seed=3`` it takes ``train.lr=1`` and leaves
    ``seed=3`` over (``parse_intermixed_args`` would fix that but refuses sub-commands, which
    ``fmpipe bench`` has). The tokens left over are overrides when they have that form, kept
    in command-line order after the ones argparse took; anything else gets argparse's own
    "unrecognized arguments" error (exit 2). A parser (or sub-command) without
    :func:`add_config_arguments` takes no overrides at all.
    """
    args, extras = parser.parse_known_args(None if argv is None else list(argv))
    takes_overrides = hasattr(args, "overrides")
    overrides = [*(args.overrides or []), *extras] if takes_overrides else list(extras)
    bad = [token for token in overrides if not (takes_overrides and is_override(token))]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if takes_overrides:
        args.overrides = overrides
    return args


def overrides_from(pairs: Mapping[str, Any]) -> list[str]:
    """``{"train.lr": 1e-3, "data.uri": None}`` -> ``["train.lr=0.001"]`` (None: flag not given).

    Values are JSON, which YAML reads back as the same value (a string stays a string)."""
    return [f"{key}={json.dumps(value)}" for key, value in pairs.items() if value is not None]


def shortcut_values(args: argparse.Namespace, shortcuts: Mapping[str, str]) -> dict[str, Any]:
    """``{config key: value}`` of the flag shortcuts given; ``shortcuts`` maps an argparse
    dest (``images``) to its config key (``train.total_images``). A flag not given is None."""
    return {key: getattr(args, dest) for dest, key in shortcuts.items()}


def _check_no_clash(
    args: argparse.Namespace, shortcuts: Mapping[str, str], overrides: Sequence[str]
) -> None:
    """Refuse a flag shortcut and an override of the same key on one command line."""
    flags = {key: dest for dest, key in shortcuts.items() if getattr(args, dest) is not None}
    for text in overrides:
        key = ".".join(part.strip() for part in parse_override(text)[0])
        if key in flags:
            dest = flags[key]
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(
                f"'{key}' is given twice on the command line: by {flag} "
                f"({json.dumps(getattr(args, dest))}) and by the override '{text}'; give one"
            )


def packaged_defaults(*names: str) -> dict[str, Any]:
    """The job defaults ``jobs/configs/<name>.yaml`` as a dict; several names merge, the
    later winning (``packaged_defaults("train", "demo")``)."""
    tree: dict[str, Any] = {}
    for name in names:
        text = resources.files("jobs").joinpath("configs", f"{name}.yaml").read_text()
        tree = merge_trees(tree, yaml.safe_load(text) or {})
    return tree


def resolve_config(
    args: argparse.Namespace,
    defaults: str | Sequence[str] | None = None,
    shortcuts: Mapping[str, str] | None = None,
) -> Config:
    """Packaged defaults < --config < flag shortcuts and overrides, validated.

    ``defaults`` names jobs/configs/<name>.yaml (several: merged in order); ``shortcuts``
    maps the job's flags (argparse dests) to config keys, see :func:`shortcut_values`."""
    names = [defaults] if isinstance(defaults, str) else list(defaults or [])
    base = packaged_defaults(*names) if names else None
    overrides = list(getattr(args, "overrides", None) or [])
    shortcuts = shortcuts or {}
    _check_no_clash(args, shortcuts, overrides)
    flags = overrides_from(shortcut_values(args, shortcuts))
    path = Path(args.config) if getattr(args, "config", None) else None
    return load_config(path, [*flags, *overrides], defaults=base)


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
    quiet_library_loggers()  # their detail stays in Ray's log files (pipeline.rayenv)
    with redacted_console():  # every line the job prints or logs is scrubbed
        try:
            return body()
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
