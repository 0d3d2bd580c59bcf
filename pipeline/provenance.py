"""Where a run's code came from: the git commit and the package versions (standard library only).

One place for both users: the MLflow tags every run carries (:func:`standard_tags`, used by
:mod:`pipeline.tracking`) and the commit ``fmpipe submit`` sends with a job as
``FMPIPE_GIT_COMMIT`` (the job's copy of the repository has no ``.git``, so the job reads
the variable back here).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

__all__ = ["REPO_ROOT", "git_commit", "package_version", "standard_tags"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_COMMIT = re.compile(r"[0-9a-f]{40,64}")


def git_commit(*where: str | os.PathLike[str]) -> str | None:
    """``FMPIPE_GIT_COMMIT`` (set in images and by ``fmpipe submit``), else
    ``git rev-parse HEAD`` in the first of ``where`` that is a git checkout (default: this
    package's repository, then the working directory), else None."""
    env = os.environ.get("FMPIPE_GIT_COMMIT", "").strip()
    if env:
        return env
    for root in where or (REPO_ROOT, Path.cwd()):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        commit = out.stdout.strip()
        if out.returncode == 0 and _COMMIT.fullmatch(commit):
            return commit
    return None


def package_version(package: str) -> str:
    """The installed version of ``package``, or "unknown"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def standard_tags() -> dict[str, str]:
    """Tags every fmpipe run carries: git commit and package versions."""
    commit = git_commit() or "unknown"
    tags = {
        "fmpipe.git_commit": commit,
        "fmpipe.version": package_version("fmpipe"),
        "fmpipe.torch_version": package_version("torch"),
        "fmpipe.ray_version": package_version("ray"),
        "fmpipe.mlflow_version": package_version("mlflow"),
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    return tags
