"""The one secret scrubber: every error, log line, MLflow param/tag and summary goes through it.

It sits at the bottom of the package (standard library only), so any module may use it:
storage errors, the tracker, ``fmpipe submit``, the job entry points and their log handlers.

What counts as a secret:

- the value of every *secret variable* that is set: the named ones (:data:`SECRET_ENV_VARS`:
  AWS keys and session tokens, MLflow's password and token, ``RAY_AUTH_TOKEN``) and any
  other whose name says SECRET / PASSWORD / TOKEN / CREDENTIAL / API_KEY / PRIVATE_KEY
  (``FMPIPE_TEST_SECRET``, ``SOME_API_TOKEN``), except ones that hold a path, URL, mode or
  name rather than the secret itself (``RAY_AUTH_TOKEN_PATH``, ``..._FILE``, ...);
- the content of the Ray token file (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``):
  the token a job sends is as secret as the variable;
- credentials other modules learned and :func:`remember`-ed (the keys the AWS chain resolved
  to for a client built by :mod:`pipeline.storage`, e.g. from a profile or instance role);
- the password of a ``scheme://user:password@host`` URL;
- the value in ``secret_key='...'``, ``password=...``, ``token: ...`` (a credential written as
  a key/value pair, e.g. in an exception text from botocore).

Values shorter than 4 characters are left alone (they would scrub ordinary words, and no real
secret is that short), as are boolean-like values of pattern-matched variables
(``SOME_TOKEN_ENABLED=true``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "REDACTED",
    "SECRET_ENV_VARS",
    "RedactingFilter",
    "ScrubbingStream",
    "install_log_redaction",
    "is_secret_name",
    "looks_like_secret_key",
    "redacted_console",
    "remember",
    "scrub",
    "secret_values",
]

REDACTED = "***"
MIN_SECRET_LEN = 4

# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
)
# Other variables are secrets by name, except ones that hold a path to a secret (or a mode,
# a URL, ...) rather than the secret itself.
_SECRET_ENV_NAME = re.compile(
    r"(?:^|_)(?:SECRETS?|PASSWORD|PASSWD|TOKEN|CREDENTIALS?|API_KEY|PRIVATE_KEY)(?:_|$)"
)
_NOT_A_SECRET_ENV = re.compile(
    r"_(?:PATH|FILE|DIR|MODE|URI|URL|ENDPOINT|TYPE|NAME|ENABLED|DISABLED)$"
)
_NOT_A_SECRET_VALUE = {"true", "false", "yes", "no", "none", "null", "on", "off"}
# A key component that names a credential: storage.secret_key, aws_access_key_id, db.password.
_SECRET_KEY = re.compile(
    r"(?:^|[._\-/])(?:secret|password|passwd|token|credentials?|api[_-]?key|access[_-]?key"
    r"|private[_-]?key|session[_-]?token)(?:[._\-/]|$)",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]+):[^/\s@]+@")
# ``secret_key='v'``, ``password=v``, ``token: v`` (the value up to a quote, space or separator).
_KEY_VALUE = re.compile(
    r"(?i)((?:aws_)?(?:secret_access_key|secret_key|access_key_id|access_key|session_token"
    r"|secret|password|token|credential)[\"']?\s*[=:]\s*[\"']?)(?!\*\*\*)[^\s\"',;&)]+"
)

_remembered: set[str] = set()
_lock = threading.Lock()
_token_cache: dict[str, tuple[tuple[int, int], str | None]] = {}  # path -> (mtime, size), token


def is_secret_name(name: str) -> bool:
    """Whether the environment variable ``name`` holds a secret (by name alone): one of
    :data:`SECRET_ENV_VARS`, or a name with SECRET/PASSWORD/TOKEN/... that is not a path,
    URL, mode or name (``RAY_AUTH_TOKEN_PATH`` is not a secret; ``SOME_API_TOKEN`` is)."""
    upper = name.upper()
    if upper in SECRET_ENV_VARS:
        return True
    return bool(_SECRET_ENV_NAME.search(upper)) and not _NOT_A_SECRET_ENV.search(upper)


def looks_like_secret_key(key: str) -> bool:
    """Whether a config / param / tag key names a credential (``storage.secret_key``,
    ``aws_access_key_id``, ``db.password``, ``x.token``)."""
    return bool(_SECRET_KEY.search(str(key)))


def remember(*values: str | None) -> None:
    """Scrub these values from now on, wherever they appear (e.g. credentials the AWS chain
    resolved to from a profile file, which no variable names)."""
    with _lock:
        for value in values:
            if value and len(value) >= MIN_SECRET_LEN:
                _remembered.add(value)


def _token_file_value(path: Path) -> str | None:
    """The token in ``path`` (cached by mtime and size: scrub runs once per param)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _token_cache.get(str(path))
    if cached is not None and cached[0] == key:
        return cached[1]
    value: str | None = None
    if stat.st_size <= 4096:  # a token file, not something else someone pointed us at
        try:
            value = path.read_text(errors="replace").strip() or None
        except OSError:
            value = None
    _token_cache[str(path)] = (key, value)
    return value


# secret_values() of os.environ, kept while the environment, the token files and the
# remembered values are unchanged: scrub runs on every console line and log record, and
# rebuilding the list costs a regex per variable (~50 us for 35 variables).
_cache: dict[str, Any] = {"key": None, "values": []}


def _cache_key() -> tuple[Any, ...]:
    env = tuple(os.environ.items())
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    stats = []
    for path in ([Path(token_path).expanduser()] if token_path else []) + [
        Path.home() / ".ray" / "auth_token"
    ]:
        try:
            stat = path.stat()
            stats.append((str(path), stat.st_mtime_ns, stat.st_size))
        except OSError:
            stats.append((str(path), None, None))
    with _lock:
        remembered = len(_remembered)
    return env, tuple(stats), remembered


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """Every secret value known now, longest first (a secret may contain another)."""
    if env is None:
        key = _cache_key()
        if _cache["key"] == key:
            return list(_cache["values"])
        values = _secret_values(dict(os.environ))
        _cache["key"], _cache["values"] = key, values
        return list(values)
    return _secret_values(env)


def _secret_values(env: dict[str, str]) -> list[str]:
    values: set[str] = set()
    for name, value in env.items():
        if not value or len(value) < MIN_SECRET_LEN or not is_secret_name(name):
            continue
        if name.upper() not in SECRET_ENV_VARS and value.strip().lower() in _NOT_A_SECRET_VALUE:
            continue
        values.add(value)
        if value.strip() != value and len(value.strip()) >= MIN_SECRET_LEN:
            values.add(value.strip())
    token_path = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    paths = [Path(token_path).expanduser()] if token_path else []
    paths.append(Path.home() / ".ray" / "auth_token")
    for path in paths:
        token = _token_file_value(path)
        if token and len(token) >= MIN_SECRET_LEN:
            values.add(token)
    with _lock:
        values |= _remembered
    return sorted(values, key=len, reverse=True)


def scrub(text: object) -> str:
    """``text`` (``str()`` of it) with every secret replaced by ``***``; see the module doc."""
    out = str(text)
    for value in secret_values():
        if value in out:
            out = out.replace(value, REDACTED)
    out = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", out)
    return _KEY_VALUE.sub(lambda m: m.group(1) + REDACTED, out)


class RedactingFilter(logging.Filter):
    """A handler filter that scrubs each record's message, exception text and stack before
    any formatter sees them (attach it to handlers: handler filters see every record that
    reaches the handler, whichever logger it came from)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach a :class:`RedactingFilter` to every handler of ``logger`` (default: the root
    logger), once; call it after ``logging.basicConfig``."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


class ScrubbingStream:
    """A text stream (``sys.stdout``/``sys.stderr``) whose output goes through :func:`scrub`.

    Text is held back until a line ends (``\n`` or ``\r``) or the stream is flushed, so that
    a secret written in two pieces is still whole when it is scrubbed; everything else
    (``isatty``, ``fileno``, ``encoding``, ...) is the wrapped stream's.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending = ""
        self._lock = threading.Lock()

    @property
    def wrapped(self) -> TextIO:
        return self._stream

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            cut = max(self._pending.rfind("\n"), self._pending.rfind("\r"))
            if cut >= 0:
                ready, self._pending = self._pending[: cut + 1], self._pending[cut + 1 :]
                self._stream.write(scrub(ready))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._stream.write(scrub(self._pending))
                self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_console() -> Iterator[None]:
    """While inside: everything this process prints is scrubbed (``sys.stdout`` and
    ``sys.stderr`` are :class:`ScrubbingStream` s), and so is every record the root logger's
    handlers write (a :class:`RedactingFilter`; enter after ``logging.basicConfig``). On the
    way out the held-back text is flushed and the streams are put back, so a caller that ran a
    job's ``main()`` in-process (a test's ``capsys``) sees every line. For the job entry
    points; not for commands whose output is a secret on purpose (``fmpipe stack env``)."""
    saved = {name: getattr(sys, name) for name in ("stdout", "stderr")}
    wrapped = {
        name: ScrubbingStream(stream)
        for name, stream in saved.items()
        if stream is not None and not isinstance(stream, ScrubbingStream)
    }
    for name, stream in wrapped.items():
        setattr(sys, name, stream)
    install_log_redaction()
    try:
        yield
    finally:
        for name, stream in wrapped.items():
            with contextlib.suppress(Exception):
                stream.flush()
            if getattr(sys, name) is stream:
                setattr(sys, name, saved[name])
