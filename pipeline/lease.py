"""Exclusive, renewable leases in object storage or on a local path: one holder at a time.

Used where two fmpipe processes must not both do one thing: the retrain of a (model, alias)
(:mod:`pipeline.retrain`, whose promotion is a compare-and-set under this lease).

How a lease is exclusive
------------------------
A lease is one object (or file) under ``<train.storage_path>/_locks/``.

- **On S3** it is created with a conditional PUT (``If-None-Match: *``): the store creates the
  object for exactly one of any number of concurrent writers and answers 412 to the others.
  The body holds a random token, the owner and an expiry (``LEASE_TTL_S``); a heartbeat
  thread (:class:`Heartbeat`) extends it every ``LEASE_TTL_S / 4`` with ``If-Match: <our
  ETag>``, which succeeds only while the object is still the one we wrote. A lease left by a
  dead process is taken over after it expires, again with ``If-Match: <the expired object's
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
import json
import logging
import os
import socket
import threading
import time
import uuid
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
    "S3Lease",
    "open_lease",
]

log = logging.getLogger(__name__)

LEASE_TTL_S = 120.0  # a lease not renewed for this long may be taken over


class LeaseError(RuntimeError):
    """The lock store cannot provide an exclusive lease (e.g. ignores conditional writes)."""


# --------------------------------------------------------------------------- leases
class Lease(Protocol):
    """An exclusive, renewable lease. ``acquire`` never blocks."""

    lost: bool

    def acquire(self) -> bool: ...
    def renew(self) -> bool: ...
    def release(self) -> None: ...
    def holder(self) -> dict[str, Any] | None: ...


def _owner() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} thread {threading.get_ident()}"


def _lease_body(token: str, ttl: float) -> dict[str, Any]:
    now = time.time()
    return {"token": token, "owner": _owner(), "renewed_at": now, "expires_at": now + ttl}


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
    def acquire(self) -> bool:
        from botocore.exceptions import ClientError

        self._probe()
        for _ in range(3):
            try:
                self._etag = self._put(_lease_body(self.token, self.ttl), IfNoneMatch="*")
                return self._confirm()
            except ClientError as exc:
                if not self._refused(exc):
                    raise
            current = self._read()
            if current is None:  # released in between: try again
                continue
            body, etag = current
            if float(body.get("expires_at", 0.0)) > time.time():
                return False
            try:  # expired: take it over, unless someone else changed it first
                self._etag = self._put(_lease_body(self.token, self.ttl), IfMatch=etag)
            except ClientError as exc:
                if not self._refused(exc):
                    raise
                return False
            log.warning(
                "took over the expired lease %s of %s", self.uri, body.get("owner", "unknown")
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
            self._etag = self._put(_lease_body(self.token, self.ttl), IfMatch=self._etag)
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
    """Renews a lease every ``ttl / 4`` seconds in a daemon thread until stopped."""

    def __init__(self, lease: Lease, ttl: float) -> None:
        self.lease = lease
        self.interval = max(0.05, ttl / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmpipe-lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.lease.renew():
                    log.error("the retrain lease was lost; this run will not promote")
                    return
            except Exception as exc:  # a network blip: try again at the next beat
                log.warning("renewing the retrain lease failed: %s", exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
