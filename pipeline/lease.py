"""Exclusive, renewable leases in object storage or on a local path: one holder at a time.

Used where two fmpipe processes must not both do one thing:

- **One writer per run.** :func:`pipeline.train.trainer.train` holds the lease of its run,
  ``<train.storage_path>/_locks/runs/<run_name>.lock`` (:func:`hold_run_lease`), for the whole
  run. It is taken before the MLflow run is started or ``fmpipe_run.json`` written, so a
  second ``fmpipe train`` with the same run name and storage path touches nothing: it fails
  at once with :class:`LeaseHeldError`, one line naming the holder (``host:pid``, since when,
  until when) and what to do. Without it both runs wrote the same checkpoints, and the one
  that failed could leave the run pointer naming its MLflow run. After a run killed with
  SIGKILL, a local lock is free at once (the kernel drops the ``flock``); an S3 lease expires
  ``LEASE_TTL_S`` after its last renewal, the time the refusal names.
- **One retrain per (model, alias)**, ``<train.storage_path>/_locks/<model>_<alias>.lock``
  (:func:`open_lease`): :mod:`pipeline.retrain` promotes by a compare-and-set under it. Its
  candidate is trained through ``train()``, so the candidate's run lease is a second lease
  inside the retrain's: another file (run leases have their own folder), which composes.

How a lease is exclusive
------------------------
A lease is one object (or file) under ``<train.storage_path>/_locks/``.

- **On S3** it is created with a conditional PUT (``If-None-Match: *``): the store creates the
  object for exactly one of any number of concurrent writers and answers 412 to the others.
  The body holds a random token, the owner and an expiry (``LEASE_TTL_S``); a heartbeat
  thread (:class:`Heartbeat`) extends it every ``LEASE_TTL_S / 4`` with ``If-Match: <our
  ETag>``, which succeeds only while the object is still the one we wrote. A lease left by a
  dead process is taken over after it expires (at once when that process ran on this host
  and is gone: :func:`_holder_is_gone`), again with ``If-Match: <the expired object's
  ETag>``, so of several runs that see the same expired lease exactly one wins. Before using
  the lease the store is probed once (a second ``If-None-Match`` PUT of a probe object must
  fail), so a store that ignores the header is refused (:class:`LeaseError`) rather than
  trusted.
- **On a local (or shared) path** the lease is ``fcntl.flock`` on that file: the kernel grants
  it to one open file at a time (two opens in one process exclude each other too) and
  releases it when the process dies, so it needs no expiry.

Limits: (a) a lease protects only processes that take it, with the same
``train.storage_path``; (b) a process frozen for longer than ``LEASE_TTL_S`` between its last
renewal and its next write could overlap with one that took the expired lease (expiry uses
wall clocks, so hosts need roughly synchronised clocks); (c) ``flock`` on NFS depends on the
NFS lock manager.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.storage import Location

__all__ = [
    "LEASE_TTL_S",
    "FileLease",
    "Heartbeat",
    "Lease",
    "LeaseError",
    "LeaseHeldError",
    "S3Lease",
    "describe_holder",
    "hold_run_lease",
    "open_lease",
    "open_run_lease",
    "run_lease_location",
    "run_lease_name",
]

log = logging.getLogger(__name__)

LEASE_TTL_S = 120.0  # a lease not renewed for this long may be taken over


class LeaseError(RuntimeError):
    """The lock store cannot provide an exclusive lease (e.g. ignores conditional writes)."""


# --------------------------------------------------------------------------- leases
class LeaseHeldError(LeaseError):
    """The lease is held by another process; ``holder`` is its body (None when unreadable)."""

    def __init__(self, message: str, uri: str, holder: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.uri = uri
        self.holder = holder


class Lease(Protocol):
    """An exclusive, renewable lease. ``acquire`` never blocks."""

    uri: str  # where the lease lives (s3://... or a path), for messages
    ttl: float
    lost: bool

    def acquire(self) -> bool: ...
    def renew(self) -> bool: ...
    def release(self) -> None: ...
    def holder(self) -> dict[str, Any] | None: ...


def _owner() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} thread {threading.get_ident()}"


def _lease_body(token: str, ttl: float, since: float | None = None) -> dict[str, Any]:
    """The lease's content: who holds it (``owner``; ``host`` and ``pid`` for messages), since
    when (``acquired_at``), and until when (``expires_at``)."""
    now = time.time()
    return {
        "token": token,
        "owner": _owner(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "acquired_at": now if since is None else since,
        "renewed_at": now,
        "expires_at": now + ttl,
    }


def _holder_is_gone(body: dict[str, Any]) -> bool:
    """True when the lease's holder ran on this host and that process no longer exists.

    A run that died while S3 was unreachable could not release its lease; waiting out the
    TTL would refuse the re-run for minutes although the holder is known dead. Only a holder
    on this very host can be checked (``os.kill(pid, 0)``); a recycled pid only makes this
    answer False (wait for the expiry), never wrongly True."""
    if body.get("host") != socket.gethostname() or not isinstance(body.get("pid"), int):
        return False
    try:
        os.kill(int(body["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


class S3Lease:
    """An exclusive lease as one S3 object, by conditional writes (see the module doc)."""

    def __init__(self, location: Location, storage: Any = None, ttl: float = LEASE_TTL_S):
        from pipeline.storage import boto3_client

        if not location.is_s3:
            raise ValueError(f"S3Lease needs an s3:// location, got {location.uri}")
        self.uri = location.uri
        self.bucket = str(location.bucket)
        self.key = location.key
        self.ttl = float(ttl)
        self.token = uuid.uuid4().hex
        self.lost = False
        self._etag: str | None = None
        self._since: float | None = None  # when this lease was acquired (kept by renewals)
        self._client = boto3_client(storage)

    # ---- S3 calls
    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _refused(self, exc: Exception) -> bool:
        """A conditional write lost: 412, or 409 (a concurrent conditional write, on AWS)."""
        return self._code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "412")

    def _put(self, body: dict[str, Any], **condition: str) -> str:
        response = self._client.put_object(
            Bucket=self.bucket,
            Key=self.key,
            Body=json.dumps(body).encode(),
            ContentType="application/json",
            **condition,
        )
        return str(response["ETag"])

    def _read(self) -> tuple[dict[str, Any], str] | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            body = json.loads(response["Body"].read().decode())
        except ValueError:
            body = {}  # unreadable: treated as expired
        return body, str(response["ETag"])

    def _probe(self) -> None:
        """Refuse a store that ignores If-None-Match (it would grant every writer)."""
        from botocore.exceptions import ClientError

        key = f"{self.key}.probe-{self.token}"
        self._client.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
        except ClientError as exc:
            if not self._refused(exc):
                raise
        else:
            raise LeaseError(
                f"the S3 store of {self.uri} ignores conditional writes (If-None-Match), so "
                "it cannot grant an exclusive lease; use a store that supports them (AWS S3, "
                "SeaweedFS, MinIO, ...) or a local train.storage_path"
            )
        finally:
            with contextlib.suppress(Exception):
                self._client.delete_object(Bucket=self.bucket, Key=key)

    # ---- the lease
    def _body(self) -> dict[str, Any]:
        return _lease_body(self.token, self.ttl, self._since)

    def acquire(self) -> bool:
        from botocore.exceptions import ClientError

        self._probe()
        self._since = time.time()
        for _ in range(3):
            try:
                self._etag = self._put(self._body(), IfNoneMatch="*")
                return self._confirm()
            except ClientError as exc:
                if not self._refused(exc):
                    raise
            current = self._read()
            if current is None:  # released in between: try again
                continue
            body, etag = current
            if float(body.get("expires_at", 0.0)) > time.time() and not _holder_is_gone(body):
                return False
            try:  # expired, or its holder died on this host: take it over, unless someone
                # else changed it first
                self._etag = self._put(self._body(), IfMatch=etag)
            except ClientError as exc:
                if not self._refused(exc):
                    raise
                return False
            log.warning(
                "took over the lease %s of %s (expired, or that process is gone)",
                self.uri,
                body.get("owner", "unknown"),
            )
            return self._confirm()
        return False

    def _confirm(self) -> bool:
        current = self._read()
        mine = current is not None and current[0].get("token") == self.token
        if mine:
            self._etag = current[1]
        return mine

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) when it is no longer ours."""
        from botocore.exceptions import ClientError

        if self._etag is None or self.lost:
            return False
        try:
            self._etag = self._put(self._body(), IfMatch=self._etag)
            return True
        except ClientError as exc:
            if not self._refused(exc):
                raise
            self.lost = True
            return False

    def release(self) -> None:
        from botocore.exceptions import ClientError

        if self._etag is None or self.lost:
            return
        etag, self._etag = self._etag, None
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except ClientError as exc:
            if self._refused(exc):
                return  # not ours any more: leave it to its holder
            # stores without conditional deletes: delete only what still holds our token
            current = self._read()
            if current is not None and current[0].get("token") == self.token:
                self._client.delete_object(Bucket=self.bucket, Key=self.key)

    def holder(self) -> dict[str, Any] | None:
        current = self._read()
        return current[0] if current else None


class FileLease:
    """An exclusive lease as ``flock`` on a local file (released by the kernel on exit)."""

    def __init__(self, path: str | os.PathLike[str], ttl: float = LEASE_TTL_S):
        self.path = Path(path)
        self.uri = str(self.path)
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self.lost = False
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        os.ftruncate(fd, 0)
        body = _lease_body(self.token, self.ttl)
        body["expires_at"] = None  # held until released or the process ends
        os.pwrite(fd, json.dumps(body).encode(), 0)
        return True

    def renew(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)  # the file stays: unlinking a lock file lets two holders in

    def holder(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
        except OSError:
            return None
        with contextlib.suppress(ValueError):
            return json.loads(text) if text.strip() else None
        return None


def open_lease(cfg: Config, name: str, alias: str, ttl: float = LEASE_TTL_S) -> Lease:
    """The lease of (model ``name``, ``alias``) under ``<train.storage_path>/_locks/``."""
    from pipeline.home import storage_path
    from pipeline.storage import resolve

    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in f"{name}@{alias}")
    where = resolve(storage_path(cfg), cfg.storage).child("_locks", f"{safe}.lock")
    if where.is_s3:
        return S3Lease(where, cfg.storage, ttl)
    return FileLease(where.path, ttl)


class Heartbeat:
    """Renews a lease every ``ttl / 4`` seconds in a daemon thread until stopped.

    ``what`` names the lease and ``if_lost`` says what losing it means, in the log lines."""

    def __init__(
        self,
        lease: Lease,
        ttl: float,
        what: str = "the retrain lease",
        if_lost: str = "this run will not promote",
    ) -> None:
        self.lease = lease
        self.what, self.if_lost = what, if_lost
        self.interval = max(0.05, ttl / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmpipe-lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.lease.renew():
                    log.error("%s was lost; %s", self.what, self.if_lost)
                    return
            except Exception as exc:  # a network blip: try again at the next beat
                log.warning("renewing %s failed: %s", self.what, exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------- the run lease
RUN_LOCKS = ("_locks", "runs")  # <storage_path>/_locks/runs/<run name>.lock


def run_lease_name(run_name: str) -> str:
    """The lock file name of ``run_name``: the name itself when it is a plain file name, else
    a plain form plus a hash of the exact name, so two run names never share one lock.

    Run leases sit in their own folder, ``_locks/runs/``: retrain's ``_locks/<model>_<alias>
    .lock`` files cannot collide with them whatever the names (a model ``run-x`` with alias
    ``y`` and a run ``x_y`` would, in one flat folder)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in run_name)
    if safe != run_name or safe.startswith(".") or len(safe) > 120:
        digest = hashlib.sha256(run_name.encode()).hexdigest()[:12]
        safe = f"{safe.lstrip('.')[:120]}-{digest}"
    return f"{safe}.lock"


def run_lease_location(storage: Location, run_name: str) -> Location:
    """Where the lease of run ``run_name`` under ``storage`` (``train.storage_path``) lives."""
    return storage.child(*RUN_LOCKS, run_lease_name(run_name))


def open_run_lease(cfg: Config, storage: Location | None = None, ttl: float = LEASE_TTL_S) -> Lease:
    """The (not yet acquired) lease of run ``train.run_name`` in ``train.storage_path``
    (``storage``: that path, already resolved)."""
    from pipeline.config import ConfigError

    if not cfg.train.run_name.strip():
        raise ConfigError("train.run_name is empty; give the run a name (--run-name NAME)")
    if storage is None:
        from pipeline.home import storage_path
        from pipeline.storage import resolve

        storage = resolve(storage_path(cfg), cfg.storage)
    where = run_lease_location(storage, cfg.train.run_name)
    if where.is_s3:
        return S3Lease(where, cfg.storage, ttl)
    return FileLease(where.path, ttl)


def _utc(stamp: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(stamp)))
    except (TypeError, ValueError, OverflowError, OSError):  # a body not written by us
        return str(stamp)


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``host:pid since <when> (<until when>)`` from a lease body, for a one-line message."""
    if not holder:
        return "another process (it may have just finished: try again)"
    who = (
        f"{holder['host']}:{holder['pid']}"
        if holder.get("host") and holder.get("pid")
        else str(holder.get("owner") or "an unknown owner")
    )
    since = holder.get("acquired_at", holder.get("renewed_at"))
    text = who + (f" since {_utc(since)}" if since is not None else "")
    until = holder.get("expires_at")
    if until is None:
        return f"{text} (held until that process exits)"
    return (
        f"{text} (lease until {_utc(until)}, renewed while it runs; "
        "a lease left by a process that died expires then)"
    )


def _refused_message(cfg: Config, lease: Lease, holder: dict[str, Any] | None) -> str:
    return (
        f"run '{cfg.train.run_name}' is already being trained by {describe_holder(holder)}; "
        f"lock {lease.uri}. Wait for it to finish, or pick another run name "
        "(--run-name / train.run_name)"
    )


HOLDER_WAIT_S = 2.0  # how long a refused run waits for the holder to write who it is


def _read_holder(lease: Lease, wait_s: float = HOLDER_WAIT_S) -> dict[str, Any] | None:
    """The holder's body, for the refusal; None when it cannot be read.

    A local lease is granted (``flock``) a moment before its holder writes who it is, so a
    run refused in that moment reads an empty file: wait briefly for the body rather than
    name "another process". An empty file after ``wait_s`` means the holder just released."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(Exception):  # the refusal matters, not who, if unreadable
            holder = lease.holder()
            if holder:
                return holder
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


@contextlib.contextmanager
def hold_run_lease(
    cfg: Config, storage: Location | None = None, ttl: float = LEASE_TTL_S
) -> Iterator[Lease]:
    """Hold the lease of run ``train.run_name`` for the ``with`` block: one writer per run.

    ``fmpipe train`` takes it before it starts an MLflow run or writes ``fmpipe_run.json``,
    so a second run with the same name and storage path touches nothing: it raises
    :class:`LeaseHeldError` at once, naming the holder. A heartbeat renews it (S3) while the
    block runs; it is released however the block ends (return, error, KeyboardInterrupt).
    Other leases compose with it: retrain holds its (model, alias) lease, another file, while
    its candidate trains under this one (``flock`` is per open file, so no self-deadlock)."""
    lease = open_run_lease(cfg, storage, ttl)
    try:
        acquired = lease.acquire()
    except BaseException as exc:  # half taken (written, not confirmed)? drop what is ours
        with contextlib.suppress(Exception):
            lease.release()
        if isinstance(exc, LeaseError) or not isinstance(exc, Exception):
            raise  # the store's own refusal; Ctrl-C
        # no permission, S3 unreachable, ...: say which lock and why
        raise LeaseError(
            f"cannot take the lease of run '{cfg.train.run_name}' at {lease.uri}: {exc}"
        ) from exc
    if not acquired:
        holder = _read_holder(lease)
        raise LeaseHeldError(_refused_message(cfg, lease, holder), lease.uri, holder)
    try:
        with Heartbeat(
            lease,
            lease.ttl,
            what=f"the lease of run '{cfg.train.run_name}' ({lease.uri})",
            if_lost="another fmpipe train with this run name may now write the run",
        ):
            yield lease
    finally:
        try:
            lease.release()
        except Exception as exc:  # never hide the block's own error behind this one
            log.warning("could not release %s (it expires on its own): %s", lease.uri, exc)
