"""``fmpipe submit``: run a job on a Ray cluster through the Ray Jobs API.

``fmpipe submit train --data s3://data/digits --workers 2`` is the same job as
``ray job submit --working-dir . -- python -m jobs.train --data s3://data/digits --workers 2``,
with what ``ray job submit`` leaves to the user done here:

- **Where.** ``--address`` (the dashboard, ``http://<head>:8265``), else
  ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``. (``JobSubmissionClient`` itself lets
  those variables override its ``address`` argument; here the flag wins.)
- **Authentication.** Ray 2.60 token auth: the token is sent as ``Authorization: Bearer ...``,
  read like Ray reads it: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
  ``~/.ray/auth_token``. It is sent when ``RAY_AUTH_MODE=token``, and also when the mode is
  unset and a token exists (a cluster started with the mode unset requires the token once one
  exists, while Ray's own client does not send it then); never with ``RAY_AUTH_MODE=disabled``.
  The header is built here rather than left to Ray's client, whose auth mode is read once per
  process. The token is never printed, logged or put in the job's environment.
- **What.** The repository (``runtime_env.working_dir``, minus ``.venv``, ``.git``, caches and
  local state: see :data:`EXCLUDES`) and the entry point ``python -m jobs.<job> <args>``.
- **Environment.** ``runtime_env.env_vars`` carries, when set here, the tracking URI, the S3
  endpoint and region (:data:`CARRIED_ENV`), and the commit of this checkout
  (``FMPIPE_GIT_COMMIT``, since ``.git`` is not shipped). Secrets never go: Ray keeps a job's
  ``runtime_env`` in the job's record, where ``ray job list`` and the Jobs API show it to
  anyone holding the token (and, in Ray 2.60, writes it into each node's
  ``runtime_env_agent.log``). So ``--env NAME`` carries a variable by name (its value read at
  submit time, never printed: only the names are) but refuses any secret variable, i.e. any
  name :func:`pipeline.redact.is_secret_name` accepts (``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY`` included), and a carried value that holds a credential (a tracking
  URI with ``user:password@``) is refused too. The cluster's nodes get credentials their own
  way: their environment, an instance role / IRSA, or a Kubernetes Secret mounted as env vars
  by ``secretKeyRef`` (``infra/kuberay/raycluster.yaml``).
- **Afterwards.** Follows the job's logs until it ends (``--no-wait``: returns after
  submitting) and returns its status: 0 when SUCCEEDED; otherwise non-zero, with the job's
  error message (which ends with the last lines of its output).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.provenance import git_commit
from pipeline.rayenv import quiet_library_loggers, scoped_environ
from pipeline.redact import is_secret_name, scrub

__all__ = [
    "CARRIED_ENV",
    "EXCLUDES",
    "SECRET_REFUSAL",
    "SubmitError",
    "SubmitResult",
    "auth_headers",
    "build_runtime_env",
    "entrypoint",
    "resolve_address",
    "submit",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Environment carried to the job when set here: where things are, never secrets.
CARRIED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)
# Not shipped in the working directory (Ray also honours .gitignore files).
EXCLUDES = [
    ".venv",
    ".git",
    ".fmpipe",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "*.db",
    "build",
    "dist",
]
# Why a secret is never put in a job's runtime_env, and how a cluster gets credentials instead.
SECRET_REFUSAL = (
    "secrets are not sent with a job (Ray shows a job's runtime_env to everyone holding the "
    "cluster token); give the cluster's nodes their own credentials: their environment, an "
    "instance role or IRSA, or a Kubernetes Secret as env vars by secretKeyRef "
    "(infra/kuberay/raycluster.yaml, infra/README.md#secrets)"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_POLL_S = 1.0


class SubmitError(RuntimeError):
    """The job could not be submitted (no address, no token, a bad ``--env``, ...)."""


@dataclass
class SubmitResult:
    submission_id: str
    address: str
    status: str  # SUCCEEDED | FAILED | STOPPED | PENDING/RUNNING (with wait=False)
    message: str = ""  # the job's message (for a failed job: the error and last output)
    carried_env: list[str] = field(default_factory=list)  # names only

    @property
    def exit_code(self) -> int:
        if self.status == "SUCCEEDED":
            return 0
        if self.status in ("PENDING", "RUNNING"):  # --no-wait
            return 0
        return 1


# --------------------------------------------------------------------------- address, token
def resolve_address(address: str | None, env: Mapping[str, str] | None = None) -> str:
    """``address`` > ``RAY_API_SERVER_ADDRESS`` > ``RAY_ADDRESS``.

    ``http(s)://host:port`` is the dashboard; anything else (``host:port`` of the GCS,
    ``ray://...``, ``auto``) is left to Ray, which looks the dashboard up from it."""
    env = os.environ if env is None else env
    chosen = (
        (address or "").strip()
        or env.get("RAY_API_SERVER_ADDRESS", "").strip()
        or env.get("RAY_ADDRESS", "").strip()
    )
    if not chosen:
        raise SubmitError(
            "no Ray cluster given: pass --address http://<head>:8265 (the dashboard) or set "
            "RAY_ADDRESS (`fmpipe stack up` prints it for the local stack)"
        )
    return chosen.rstrip("/")


def _read_token(env: Mapping[str, str]) -> str | None:
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_text = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_text:  # set but unreadable is an error, as in Ray (no silent fallback)
        path = Path(path_text).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise SubmitError(
                f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {exc.strerror}"
            ) from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        token = default.read_text().strip()
        if token:
            return token
    return None


def auth_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` per the rules in the module doc, or {}."""
    env = os.environ if env is None else env
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    if mode not in ("", "token"):
        raise SubmitError(f"RAY_AUTH_MODE={mode!r} is not one of: token, disabled")
    token = _read_token(env)
    if token is None:
        if mode == "token":
            raise SubmitError(
                "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN_PATH to the cluster's "
                "token file (or RAY_AUTH_TOKEN), or run `ray get-auth-token`"
            )
        return {}
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- the job
def entrypoint(job: str, args: Sequence[str], python: str = "python") -> str:
    """``python -m jobs.<job> <args>``, shell-quoted."""
    return shlex.join([python, "-m", f"jobs.{job}", *args])


def build_runtime_env(
    env_names: Sequence[str] = (),
    *,
    working_dir: str | os.PathLike[str] = REPO_ROOT,
    env: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The job's ``runtime_env`` and the names of the variables it carries.

    ``env_names`` are the ``--env`` names: each must be set here (a missing one is an
    error, not a silently absent credential). Values are read from ``env`` (default
    ``os.environ``) now.
    """
    env = os.environ if env is None else env
    env_vars: dict[str, str] = {}
    for name in CARRIED_ENV:
        value = env.get(name, "").strip()
        if value:
            env_vars[name] = value
    for name in env_names:
        if "=" in name or not _ENV_NAME.match(name):
            raise SubmitError(
                f"--env takes a variable NAME (its value is read from this environment), "
                f"got {name.split('=', 1)[0]!r}{'=...' if '=' in name else ''}"
            )
        if name.startswith("RAY_AUTH"):
            raise SubmitError(f"--env {name}: the cluster has its own token; it is not shipped")
        if is_secret_name(name):
            raise SubmitError(f"--env {name} refused: {SECRET_REFUSAL}")
        if name not in env:
            raise SubmitError(f"--env {name}: {name} is not set in this environment")
        env_vars[name] = env[name]
    for name, value in env_vars.items():  # e.g. a tracking URI with user:password@ in it
        if scrub(value) != value:
            raise SubmitError(
                f"{name} holds a credential (its value is not sent: a job's environment is "
                f"readable through the Jobs API); {SECRET_REFUSAL}"
            )
    commit = git_commit(Path(working_dir))
    if commit:
        env_vars["FMPIPE_GIT_COMMIT"] = commit
    runtime_env = {
        "working_dir": str(working_dir),
        "excludes": list(EXCLUDES),
        "env_vars": env_vars,
    }
    return runtime_env, sorted(env_vars)


def _tracking_warning(env: Mapping[str, str]) -> str | None:
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return (
            "warning: MLFLOW_TRACKING_URI is not set: the job tracks to a sqlite file in its "
            "working directory on the cluster, which is deleted with it"
        )
    if uri.startswith(("sqlite:", "file:", "/", ".")):
        return (
            f"warning: MLFLOW_TRACKING_URI is a local store; on the cluster the job writes to "
            f"its own copy of that path ({uri.split('?', 1)[0]})"
        )
    return None


def jobs_client(address: str, headers: dict[str, str]) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (the Jobs API URL), whatever the environment
    says: ``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS`` would override the address it is given.

    Raises:
        SubmitError: the API is unreachable or refuses the token (one line).
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    quiet_library_loggers()  # Ray's packaging chatter (files skipped, upload done) is not ours
    with scoped_environ(unset=("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")):
        try:
            return JobSubmissionClient(address, headers=headers or None)
        except AuthenticationError as exc:
            raise SubmitError(f"the Ray Jobs API at {address} refused the token: {exc}") from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None


def _follow(client: Any, submission_id: str, out: Callable[[str], None]) -> None:
    """Stream the job's output until it ends (websocket tail; polling if that breaks)."""
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(submission_id):
            out(chunk)
            printed += len(chunk)

    try:
        asyncio.run(tail())
        return
    except Exception as exc:  # a proxy that drops websockets, a reset connection, ...
        out(f"\n[fmpipe submit] log stream ended ({type(exc).__name__}); polling instead\n")
    while True:  # fall back: poll the whole log, print what is new
        status = str(client.get_job_status(submission_id))
        logs = client.get_job_logs(submission_id)
        if len(logs) > printed:
            out(logs[printed:])
            printed = len(logs)
        if status.rsplit(".", 1)[-1] in _TERMINAL:
            return
        time.sleep(_POLL_S)


def _wait_terminal(client: Any, submission_id: str, timeout: float = 60.0) -> Any:
    """The job's info once its status is terminal (the log stream may end a moment before)."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.get_job_info(submission_id)
        status = str(info.status).rsplit(".", 1)[-1]
        if status in _TERMINAL or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def submit(
    job: str,
    args: Sequence[str] = (),
    *,
    address: str | None = None,
    env_names: Sequence[str] = (),
    wait: bool = True,
    python: str = "python",
    working_dir: str | os.PathLike[str] = REPO_ROOT,
    out: Callable[[str], None] | None = None,
    err: Callable[[str], None] | None = None,
) -> SubmitResult:
    """Submit ``python -m jobs.<job> <args>``; follow it to the end unless ``wait=False``.

    ``out`` receives the job's output as it comes (default: stdout), ``err`` fmpipe's own
    notices (default: stderr). Raises :class:`SubmitError` before anything is submitted
    when the address, token or an ``--env`` name is missing or wrong.
    """
    from pipeline.jobtable import JOBS, submittable

    def write(text: str) -> None:  # the job's output, with any credential value of ours removed
        text = scrub(text)
        if out is not None:
            out(text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def note(text: str) -> None:
        text = scrub(text)
        if err is not None:
            err(text)
        else:
            print(text, file=sys.stderr, flush=True)

    if job not in JOBS or not JOBS[job].submittable:
        allowed = ", ".join(submittable())
        raise SubmitError(f"unknown or unsubmittable job '{job}'; choose one of: {allowed}")
    url = resolve_address(address)
    headers = auth_headers()
    runtime_env, carried = build_runtime_env(env_names, working_dir=working_dir)
    warning = _tracking_warning(os.environ)
    if warning:
        note(f"[fmpipe submit] {warning}")
    command = entrypoint(job, args, python)
    submission_id = f"fmpipe-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    client = jobs_client(url, headers)
    try:
        client.submit_job(
            entrypoint=command,
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata={"fmpipe.job": job},
        )
    except RuntimeError as exc:
        raise SubmitError(f"the cluster at {url} refused the job: {exc}") from None
    note(f"[fmpipe submit] job {submission_id} on {url}: {command}")
    note(f"[fmpipe submit] environment carried: {', '.join(carried) if carried else 'none'}")
    if not wait:
        note(
            f"[fmpipe submit] not waiting; follow it with `ray job logs --follow "
            f"--address {url} {submission_id}`"
        )
        return SubmitResult(submission_id, url, "PENDING", carried_env=carried)
    try:
        _follow(client, submission_id, write)
    except KeyboardInterrupt:
        note(
            f"[fmpipe submit] stopped following; the job goes on. Stop it with "
            f"`ray job stop --address {url} {submission_id}`"
        )
        raise
    info = _wait_terminal(client, submission_id)
    status = str(info.status).rsplit(".", 1)[-1]
    message = str(info.message or "")
    result = SubmitResult(submission_id, url, status, message=message, carried_env=carried)
    if status == "SUCCEEDED":
        note(f"[fmpipe submit] job {submission_id} SUCCEEDED")
    else:
        kind = f" ({info.error_type})" if getattr(info, "error_type", None) else ""
        note(f"[fmpipe submit] job {submission_id} {status}{kind}: {message}")
    return result
