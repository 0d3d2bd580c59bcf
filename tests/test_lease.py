"""Leases (pipeline.lease) against the real SeaweedFS and the local kernel's flock: exclusive
under contention, renewable, taken over after expiry, and the run lease beside retrain's.

No Ray, no MLflow: these need only the S3 server (or a temp dir). ``train()`` under the run
lease (two concurrent runs, a killed holder) is tests/test_train_lease.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.config import build_config


def contend(make, n: int) -> list:
    """``n`` leases from ``make()`` acquiring at the same instant; returns the winners."""
    leases = [make() for _ in range(n)]
    barrier = threading.Barrier(n)
    won: list = []
    lock = threading.Lock()

    def go(lease) -> None:
        barrier.wait()
        if lease.acquire():
            with lock:
                won.append(lease)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won


# --------------------------------------------------------------------------- the two kinds
def test_s3_lease_is_exclusive_renewable_and_expires(s3_bucket):
    from pipeline.lease import S3Lease
    from pipeline.storage import resolve

    where = resolve(f"{s3_bucket}/_locks/m@champion.lock")
    won = contend(lambda: S3Lease(where, ttl=30), 8)
    assert len(won) == 1
    holder = won[0]
    assert holder.renew() and not holder.lost
    other = S3Lease(where, ttl=30)
    assert not other.acquire()
    assert other.holder()["token"] == holder.token
    holder.release()
    assert other.acquire()  # released: free again
    other.release()

    # an expired lease (its holder died: no renewals) is taken over by exactly one run
    dead = S3Lease(where, ttl=0.3)
    assert dead.acquire()
    time.sleep(0.5)
    won = contend(lambda: S3Lease(where, ttl=30), 6)
    assert len(won) == 1
    assert not dead.renew() and dead.lost  # the old holder finds out
    dead.release()  # and does not delete the new holder's lease
    assert won[0].renew()
    won[0].release()


def test_file_lease_is_exclusive(tmp_path: Path):
    from pipeline.lease import FileLease

    path = tmp_path / "locks" / "m@champion.lock"
    won = contend(lambda: FileLease(path), 6)
    assert len(won) == 1
    assert not FileLease(path).acquire()
    assert FileLease(path).holder()["token"] == won[0].token
    won[0].release()
    again = FileLease(path)
    assert again.acquire()
    again.release()


def test_a_run_refused_while_the_holder_is_still_writing_its_name_still_names_it(tmp_path: Path):
    """A local lease is granted (flock) a moment before its holder writes who it is; a run
    refused in that moment waits for the body instead of naming "another process"."""
    import fcntl
    import os
    import threading

    from pipeline.lease import FileLease, _read_holder

    path = tmp_path / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # granted, body not yet written
    late = threading.Timer(0.3, lambda: os.pwrite(fd, b'{"host": "h", "pid": 7}', 0))
    late.start()
    try:
        refused = FileLease(path)
        assert not refused.acquire()
        assert refused.holder() is None  # what the refused run read before the fix
        assert _read_holder(refused) == {"host": "h", "pid": 7}
    finally:
        late.join()
        os.close(fd)
    assert _read_holder(FileLease(tmp_path / "never-written.lock"), wait_s=0.1) is None


def test_only_a_holder_known_dead_on_this_host_is_gone():
    """The early takeover of an unexpired S3 lease: only for a holder on this host whose
    process no longer exists; another host's, a live one or an unreadable body waits."""
    import os
    import socket
    import subprocess
    import sys

    from pipeline.lease import _holder_is_gone

    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert _holder_is_gone({"host": here, "pid": dead.pid})
    assert not _holder_is_gone({"host": here, "pid": os.getpid()})  # alive
    assert not _holder_is_gone({"host": here + "-elsewhere", "pid": dead.pid})
    assert not _holder_is_gone({"host": here})  # no pid
    assert not _holder_is_gone({})


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_a_lease_names_its_holder_and_keeps_its_start_across_renewals(kind, request, tmp_path):
    """The body says who (host, pid) and since when; renewing moves only the expiry."""
    import os
    import socket

    from pipeline.lease import FileLease, S3Lease
    from pipeline.storage import resolve

    if kind == "s3":
        lease = S3Lease(resolve(f"{request.getfixturevalue('s3_bucket')}/_locks/x.lock"), ttl=30)
    else:
        lease = FileLease(tmp_path / "x.lock")
    assert lease.acquire()
    first = lease.holder()
    assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
    time.sleep(0.05)
    assert lease.renew()
    again = lease.holder()
    assert again["acquired_at"] == first["acquired_at"] <= again["renewed_at"]
    lease.release()


# --------------------------------------------------------------------------- the run lease
def run_cfg(storage: str, run_name: str, model: str = "digits"):
    return build_config(
        {"train": {"run_name": run_name, "storage_path": storage, "registered_model_name": model}}
    )


def test_run_lease_names_keep_every_run_apart():
    """A plain run name is its lock's name; names that differ never share a lock."""
    from pipeline.lease import run_lease_name

    assert run_lease_name("digits-v2.1") == "digits-v2.1.lock"
    names = ["a/b", "a_b", "a b", "a@b", ".", "..", "x" * 300, "x" * 301]
    locks = [run_lease_name(n) for n in names]
    assert len(set(locks)) == len(names)
    for lock in locks:
        assert "/" not in lock and not lock.startswith(".") and len(lock) < 200


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_run_lease_and_retrain_lease_compose_in_one_process(kind, request, tmp_path):
    """Retrain holds (model, alias) while its candidate trains under the run lease: two
    locks, both held at once by one process, even for names that would collide in one
    folder (model 'run-x' + alias 'y' vs run 'x_y'); a second taker of either is refused."""
    from pipeline.lease import hold_run_lease, open_lease, open_run_lease

    storage = f"{request.getfixturevalue('s3_bucket')}/runs" if kind == "s3" else str(tmp_path)
    cfg = run_cfg(storage, "x_y", model="run-x")
    retrain_lease = open_lease(cfg, "run-x", "y")
    assert retrain_lease.acquire()
    try:
        with hold_run_lease(cfg) as run_lease:  # no self-deadlock with flock, no shared key
            assert run_lease.uri != retrain_lease.uri
            assert not open_run_lease(cfg).acquire()  # the run is held ...
            assert not open_lease(cfg, "run-x", "y").acquire()  # ... and so is the alias
        assert open_lease(cfg, "run-x", "y").holder()["token"] == retrain_lease.token
        free = open_run_lease(cfg)
        assert free.acquire()  # released when the block ended
        free.release()
    finally:
        retrain_lease.release()


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_run_lease_is_refused_in_one_line_naming_the_holder(kind, request, tmp_path):
    import os
    import socket

    from pipeline.lease import LeaseError, LeaseHeldError, hold_run_lease

    storage = f"{request.getfixturevalue('s3_bucket')}/runs" if kind == "s3" else str(tmp_path)
    cfg = run_cfg(storage, "busy-run")
    with hold_run_lease(cfg), pytest.raises(LeaseHeldError) as refused, hold_run_lease(cfg):
        pytest.fail("a second holder of the run lease got in")
    message = str(refused.value)
    assert isinstance(refused.value, LeaseError) and "\n" not in message
    who = f"{socket.gethostname()}:{os.getpid()}"
    assert f"run 'busy-run' is already being trained by {who} since " in message
    assert "pick another run name" in message and refused.value.uri in message
    assert ("lease until" in message) == (kind == "s3")
    assert ("held until that process exits" in message) == (kind == "local")
    with hold_run_lease(cfg):  # released on the way out of both blocks
        pass


def test_run_lease_is_released_when_the_block_raises(tmp_path):
    from pipeline.lease import hold_run_lease, open_run_lease

    cfg = run_cfg(str(tmp_path), "r")
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)), hold_run_lease(cfg):
            raise error
        lease = open_run_lease(cfg)
        assert lease.acquire(), f"still held after {type(error).__name__}"
        lease.release()


def test_an_empty_run_name_is_a_config_error(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.lease import open_run_lease

    with pytest.raises(ConfigError, match=r"train\.run_name"):
        open_run_lease(run_cfg(str(tmp_path), " "))


def test_describe_holder_reads_old_and_odd_bodies():
    """Leases written before host/pid were recorded name their owner string; an unreadable
    time or a vanished holder still gives a sentence."""
    from pipeline.lease import describe_holder

    old = {"owner": "h1 pid 7 thread 9", "renewed_at": 0, "expires_at": 60}
    assert describe_holder(old).startswith(
        "h1 pid 7 thread 9 since 1970-01-01 00:00:00 UTC (lease until 1970-01-01 00:01:00 UTC"
    )
    new = {"host": "h2", "pid": 8, "acquired_at": 0, "renewed_at": 30, "expires_at": None}
    expected = "h2:8 since 1970-01-01 00:00:00 UTC (held until that process exits)"
    assert describe_holder(new) == expected
    assert "until soon" in describe_holder({"host": "h", "pid": 1, "expires_at": "soon"})
    assert "try again" in describe_holder(None)
