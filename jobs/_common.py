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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from jobs._failures import EXIT_BAD_INPUT, JobLog, run_ending
from pipeline.config import Config, ConfigError, load_config, merge_trees, parse_override
from pipeline.rayenv import ctrl_c_raises, quiet_library_loggers
from pipeline.redact import redacted_console

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


def given_keys(args: argparse.Namespace, shortcuts: Mapping[str, str]) -> set[str]:
    """The config keys the user set on this command: flag shortcuts given, ``key=value``
    overrides, and the keys of ``--config FILE`` (what a job must not override with a
    default of its own, e.g. a model's own sampling rule)."""
    keys = {key for key, value in shortcut_values(args, shortcuts).items() if value is not None}
    for text in getattr(args, "overrides", None) or []:
        keys.add(".".join(part.strip() for part in parse_override(text)[0]))
    if getattr(args, "config", None):
        from pipeline.config import _flatten

        body = yaml.safe_load(Path(args.config).read_text()) or {}
        keys |= set(_flatten(body)) if isinstance(body, dict) else set()
    return keys


def tagged_rule_unless_given(
    cfg: Config, args: argparse.Namespace, shortcuts: Mapping[str, str], model: str, section: str
) -> tuple[str, int] | None:
    """The ``(solver, steps)`` the registered ``model`` carries (its ``fmpipe.sample.*``
    tags, e.g. a distilled k-step student's), unless the user set ``<section>.solver`` or
    ``<section>.steps`` on this command; else None."""
    from pipeline.sample.source import model_sampling_rule

    if given_keys(args, shortcuts) & {f"{section}.solver", f"{section}.steps"}:
        return None
    return model_sampling_rule(cfg, model)


def apply_sampling_rule(cfg: Config, section: str, rule: tuple[str, int] | None) -> None:
    """Set ``cfg.<section>.solver`` / ``.steps`` to a model's own ``rule`` and say so."""
    if rule is None:
        return
    target = getattr(cfg, section)
    target.solver, target.steps = rule
    print(f"{'sampling' if section == 'sample' else 'evaluating'} with the model's own rule: "
          f"{rule[0]} x {rule[1]} steps (its fmpipe.sample.* tags; --solver / --steps "
          "override)")  # fmt: skip


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


def check_batch_split(cfg: Config) -> None:
    """``data.batch_size`` must split evenly over the workers and micro-batches: a config
    error (exit 2) before any work, not a traceback from inside the trainer."""
    t = cfg.train
    parts = t.num_workers * t.grad_accum
    if parts < 1 or cfg.data.batch_size % parts:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible by "
            f"train.num_workers * train.grad_accum = {t.num_workers} * {t.grad_accum} = "
            f"{parts}; change --workers, train.grad_accum or data.batch_size"
        )


@dataclass
class _Hints:
    """What the current job's failure line tells the user to do (set by :func:`run_guarded`)."""

    retry: Callable[[], str] = lambda: ""
    interrupt: Callable[[], str] = lambda: ""
    bad_input: tuple[type[BaseException], ...] = ()


_hints = _Hints()


def _as_hint(hint: str | Callable[[], str]) -> Callable[[], str]:
    return hint if callable(hint) else (lambda: hint)


def run_guarded(
    job: str,
    action: Callable[[], object],
    resume_hint: str | Callable[[], str],
    *,
    retry_hint: str | Callable[[], str] | None = None,
    bad_input: tuple[type[BaseException], ...] = (),
) -> int:
    """Run a job's main action (inside :func:`run_job`), saying what a failure line advises.

    ``resume_hint`` follows "interrupted;" after Ctrl-C (exit 130): how to resume, e.g.
    "re-run the same command to resume from checkpoint_... (N images)"; a callable is asked at
    the end, so it can name what is there then. ``retry_hint`` ends the line of a failure that
    running again may cure (exit 1); default: ``resume_hint``. A bad-input error (exit 2)
    says itself what to fix; ``bad_input`` adds classes that mean bad input for this job
    (exit 2; fmpipe's own input errors are known already). How each error becomes its line
    and exit code: :mod:`jobs._failures`.
    """
    _hints.interrupt = _as_hint(resume_hint)
    _hints.retry = _as_hint(resume_hint if retry_hint is None else retry_hint)
    _hints.bad_input = tuple(bad_input)
    del job  # the line names the job run_job was given
    action()
    return 0


def run_job(body: Callable[[], int], job: str | None = None) -> int:
    """Run a job body: every failure ends in one clear line on stderr and an exit code.

    2: a config error (``config error: ...``) or other bad input; 130: interrupted; 1: any
    other failure, with its traceback (Ray's too) in ``$FMPIPE_HOME/logs/<job>-<time>.log``,
    which the line names (see :mod:`jobs._failures`). Every line printed or logged is
    scrubbed.
    """
    name = job or "job"
    ctrl_c_raises()  # Ctrl-C means "interrupted" even where the parent ignored it
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_library_loggers()  # their detail stays in Ray's log files (pipeline.rayenv)
    fresh = _Hints()
    _hints.retry, _hints.interrupt, _hints.bad_input = fresh.retry, fresh.interrupt, ()
    log = JobLog(name)

    def guarded() -> int:
        try:
            return body()
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    with log.installed(), redacted_console():  # every line the job prints or logs is scrubbed
        return run_ending(
            name,
            guarded,
            log,
            lambda: _hints.retry(),
            lambda: _hints.interrupt(),
            lambda: _hints.bad_input,
        )
