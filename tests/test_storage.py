"""pipeline.storage against a real S3 server (SeaweedFS) and local directories."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.config import StorageConfig
from pipeline.redact import scrub
from pipeline.stack.procs import free_port
from pipeline.storage import (
    Location,
    StorageError,
    StorageInputError,
    boto3_client,
    check_access,
    read_whole,
    resolve,
    s3_endpoint,
)

MiB = 1024**2


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """An empty directory: local, or a prefix in a fresh bucket."""
    if request.param == "local":
        return resolve(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return resolve(f"{bucket}/root/")


def _error_text(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def _assert_no_secrets(exc: BaseException, *secrets: str) -> None:
    # No wrapped exception travels along (its text could hold a secret) ...
    assert exc.__cause__ is None and exc.__context__ is None
    # ... and nothing shown of the error holds one.
    text = _error_text(exc)
    for secret in secrets:
        assert secret not in text


# --------------------------------------------------------------------------- round trips


def test_round_trip(root: Location) -> None:
    assert not root.exists()
    assert root.list_names() == []
    shard = root.child("shards", "shard-000000.tar")
    shard.write_bytes(b"tar bytes")
    root.child("shards/_manifest.json").write_bytes(b"{}")
    root.child("shards", "sub", "deep.tar").write_bytes(b"deeper")

    assert shard.exists() and root.exists()
    assert shard.read_bytes() == b"tar bytes"
    assert shard.size() == 9
    shards = root.child("shards")
    assert shards.list_names() == ["_manifest.json", "shard-000000.tar"]  # files only, sorted
    assert shards.list_names(suffix=".tar") == ["shard-000000.tar"]

    shard.write_bytes(b"replaced")  # overwrite
    assert shard.read_bytes() == b"replaced"

    shard.delete()
    assert not shard.exists()
    shard.delete()  # missing: a no-op
    with pytest.raises(StorageError, match="does not exist"):
        shard.delete(missing_ok=False)
    with pytest.raises(StorageError, match="does not exist") as info:
        shard.read_bytes()
    assert shard.uri in str(info.value)
    with pytest.raises(StorageError, match="does not exist"):
        shard.size()

    shards.delete()  # a whole directory / prefix
    assert not shards.exists()
    assert root.list_names() == []


def test_uri_normalisation(root: Location) -> None:
    assert not root.uri.endswith("/")
    child = root.child("a/b", "c.bin")
    assert child.uri == root.uri + "/a/b/c.bin"
    assert child.path == root.path + "/a/b/c.bin"
    assert child.name == "c.bin"
    again = resolve(child.uri)
    assert (again.uri, again.path, again.is_s3) == (child.uri, child.path, child.is_s3)
    for bad in ("", "/", "..", "a/../b"):
        with pytest.raises(StorageError):
            root.child(bad)


def test_pickled_location_works(root: Location) -> None:
    """Ray ships Locations to workers: the pickle carries no secret and still works."""
    target = root.child("x.bin")
    target.write_bytes(b"payload")
    blob = pickle.dumps(target)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if os.environ.get(name):
            assert os.environ[name].encode() not in blob
    assert pickle.loads(blob).read_bytes() == b"payload"


def test_unpickled_locations_share_the_process_filesystem(root: Location) -> None:
    """A Location pickles as how to rebuild it: every copy unpickled in a process uses that
    process's one filesystem object (one S3 client and its connections for all tasks)."""
    blob = pickle.dumps(root.child("a", "b.bin"))
    first, second = pickle.loads(blob), pickle.loads(blob)
    assert first.filesystem is second.filesystem is root.filesystem
    assert (first.uri, first.path, first.is_s3, first.endpoint, first.region) == (
        root.child("a", "b.bin").uri,
        root.child("a", "b.bin").path,
        root.is_s3,
        root.endpoint,
        root.region,
    )


class _CountingProxy:
    """A loopback TCP proxy to an HTTP server that counts the request lines passing it."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if count:  # request lines: "GET /bucket/key HTTP/1.1"
                    self.requests += re.findall(rb"(?:^|\r\n)([A-Z]+) /\S* HTTP/1", data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def counting_proxy(s3_server, monkeypatch: pytest.MonkeyPatch) -> Iterator[_CountingProxy]:
    """S3 clients made now talk to the real server through a request-counting proxy."""
    proxy = _CountingProxy(s3_server.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    yield proxy
    proxy.close()


def test_read_whole_reads_an_s3_object_in_one_get(s3_bucket: str, counting_proxy) -> None:
    # 1.5 MiB: six of pyarrow's 256 KiB stream chunks, each a ranged GET of its own
    payload = os.urandom(3 * MiB // 2)
    shard = resolve(f"{s3_bucket}/read/shard.tar")
    shard.write_bytes(payload)
    counting_proxy.requests.clear()
    assert read_whole(shard.filesystem, shard.path) == payload
    assert shard.read_bytes() == payload
    gets = [r for r in counting_proxy.requests if r == b"GET"]
    assert len(gets) == 2, counting_proxy.requests  # one per read


def test_read_whole_local(tmp_path: Path) -> None:
    payload = os.urandom(MiB + 7)
    (tmp_path / "f.bin").write_bytes(payload)
    where = resolve(tmp_path / "f.bin")
    assert read_whole(where.filesystem, where.path) == payload
    with pytest.raises(FileNotFoundError):
        read_whole(where.filesystem, where.path + ".missing")


def test_local_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = resolve("data/train")
    assert rel.uri == str(tmp_path / "data" / "train")
    assert not rel.is_s3 and isinstance(rel.filesystem, pafs.LocalFileSystem)
    assert resolve(f"file://{tmp_path}/data/train/").uri == rel.uri
    assert resolve(f"{tmp_path}/data//train/").uri == rel.uri
    assert resolve(tmp_path / "data" / "train").uri == rel.uri


def test_s3_uri_forms(s3_server) -> None:
    loc = resolve("s3://my-bucket//some/prefix/")
    assert loc.is_s3 and loc.uri == "s3://my-bucket/some/prefix"
    assert loc.path == "my-bucket/some/prefix"
    assert (loc.bucket, loc.key) == ("my-bucket", "some/prefix")
    assert isinstance(loc.filesystem, pafs.S3FileSystem)
    assert loc.endpoint == s3_server.endpoint
    assert resolve("s3://my-bucket").path == "my-bucket"


# --------------------------------------------------------------------------- atomic writes


def _local_dir_entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = resolve(tmp_path / "out" / "model.bin")
    target.write_bytes(b"old")
    assert _local_dir_entries(tmp_path / "out") == ["model.bin"]  # no temp file left

    def broken_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="disk on fire") as info:
        target.write_bytes(b"new and much longer content")
    assert target.uri in str(info.value)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _local_dir_entries(tmp_path / "out") == ["model.bin"]


class ShortReads(io.RawIOBase):
    """A raw stream of ``total`` bytes that returns at most 1 MiB per read and can fail."""

    def __init__(self, total: int, fail_after: int | None = None) -> None:
        self.total, self.fail_after, self.sent = total, fail_after, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self.fail_after is not None and self.sent >= self.fail_after:
            raise OSError("source went away")
        n = min(len(buffer), MiB, self.total - self.sent)
        buffer[:n] = bytes([self.sent // MiB % 251]) * n
        self.sent += n
        return n

    def expected(self) -> bytes:
        return b"".join(bytes([i % 251]) * MiB for i in range(self.total // MiB))


def test_local_stream_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    target = resolve(tmp_path / "out" / "stream.bin")
    with pytest.raises(StorageError, match="source went away"):
        target.upload_fileobj(ShortReads(8 * MiB, fail_after=2 * MiB))
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_stream_with_short_reads_is_complete(root: Location) -> None:
    """Short reads are not the end of the stream (s3transfer alone would truncate here)."""
    source = ShortReads(12 * MiB)
    target = root.child("stream.bin")
    target.upload_fileobj(source, multipart_threshold=5 * MiB)
    assert target.read_bytes() == source.expected()


def test_local_file_mode_follows_umask(tmp_path: Path) -> None:
    target = resolve(tmp_path / "f.bin")
    target.write_bytes(b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_s3_failed_multipart_upload_leaves_nothing(s3_bucket: str) -> None:
    target = resolve(f"{s3_bucket}/big.bin")
    target.write_bytes(b"old")
    with pytest.raises(StorageError) as info:
        target.upload_fileobj(
            ShortReads(20 * MiB, fail_after=12 * MiB), multipart_threshold=5 * MiB
        )
    assert target.uri in str(info.value)
    assert target.read_bytes() == b"old"  # the old object is intact, nothing partial
    client = boto3_client()
    bucket = s3_bucket.removeprefix("s3://")
    pending = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert pending == []  # the failed upload was aborted


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_big_upload_file_is_intact(kind: str, tmp_path: Path, request: pytest.FixtureRequest):
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with source.open("wb") as out:
        for i in range(20):
            chunk = os.urandom(MiB - i)  # 20 MiB less a little: parts of odd sizes
            digest.update(chunk)
            out.write(chunk)
    if kind == "local":
        target = resolve(tmp_path / "dest" / "big.bin")
    else:
        target = resolve(f"{request.getfixturevalue('s3_bucket')}/dest/big.bin")
    target.upload_file(source, multipart_threshold=5 * MiB)
    assert target.size() == source.stat().st_size
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest.hexdigest()
    if kind == "s3":
        head = boto3_client().head_object(Bucket=target.bucket, Key=target.key)
        assert "-" in head["ETag"]  # it went up as a multipart upload
    else:
        assert _local_dir_entries(tmp_path / "dest") == ["big.bin"]


def test_upload_missing_source(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a file"):
        resolve(tmp_path / "x").upload_file(tmp_path / "missing.bin")


# --------------------------------------------------------------------------- check_access


def test_check_access_ok(s3_bucket: str) -> None:
    check_access(resolve(s3_bucket), must_exist=True)
    check_access(resolve(f"{s3_bucket}/new/prefix"), must_exist=False)
    resolve(f"{s3_bucket}/data/x.tar").write_bytes(b"x")
    check_access(resolve(f"{s3_bucket}/data"), must_exist=True)
    check_access(resolve(f"{s3_bucket}/data/x.tar"), must_exist=True)


def test_missing_bucket(s3_server) -> None:
    uri = "s3://no-such-bucket-here/prefix"
    for must_exist in (False, True):
        with pytest.raises(StorageError) as info:
            check_access(resolve(uri), must_exist=must_exist)
        message = str(info.value)
        assert "bucket 'no-such-bucket-here' does not exist" in message
        assert uri in message and s3_server.endpoint in message
        assert isinstance(info.value, StorageInputError) and info.value.exit_code == 2


def test_missing_prefix(s3_bucket: str) -> None:
    resolve(f"{s3_bucket}/datax/file").write_bytes(b"x")  # a prefix sharing the start
    uri = f"{s3_bucket}/data"
    with pytest.raises(StorageError, match="prefix 'data' does not exist") as info:
        check_access(resolve(uri), must_exist=True)
    assert uri in str(info.value) and isinstance(info.value, StorageInputError)
    check_access(resolve(uri), must_exist=False)


def test_wrong_endpoint_fails_fast(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
    location = resolve(f"{s3_bucket}/data")
    began = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach") as info:
        check_access(location, must_exist=False)
    assert time.monotonic() - began < 5.0
    assert location.uri in str(info.value) and closed in str(info.value)
    assert not isinstance(info.value, StorageInputError)  # unreachable: a re-run may work


@pytest.mark.parametrize("which", ["secret", "access_key"])
def test_bad_credentials(
    which: str, s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_secret = "WrongSecret" + "x" * 29
    wrong_key = "WRONGKEYID12345"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    if which == "access_key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", wrong_key)
    location = resolve(f"{s3_bucket}/data")
    with pytest.raises(StorageError) as info:
        check_access(location, must_exist=False)
    message = str(info.value)
    assert location.uri in message and s3_server.endpoint in message
    expected = "SignatureDoesNotMatch" if which == "secret" else "InvalidAccessKeyId"
    assert expected in message and isinstance(info.value, StorageInputError)
    _assert_no_secrets(info.value, wrong_secret, wrong_key, s3_server.secret_key)
    _assert_no_secrets(info.value, s3_server.access_key)
    # Plain operations report the failure the same way: URI named, no secret.
    with pytest.raises(StorageError) as info:
        location.child("x.bin").write_bytes(b"x")
    assert location.uri in str(info.value)
    assert isinstance(info.value, StorageInputError), info.value  # refused, not unreachable
    _assert_no_secrets(info.value, wrong_secret, wrong_key, s3_server.secret_key)
    with pytest.raises(StorageError) as info:
        location.list_names()
    _assert_no_secrets(info.value, wrong_secret, wrong_key, s3_server.secret_key)


def test_check_access_local(tmp_path: Path) -> None:
    missing = resolve(tmp_path / "missing")
    with pytest.raises(StorageError, match="does not exist") as info:
        check_access(missing, must_exist=True)
    assert missing.uri in str(info.value)
    check_access(missing, must_exist=False)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StorageError, match="is a file"):
        check_access(resolve(tmp_path / "file" / "below"), must_exist=False)
    # The location itself a file (an output or storage path given as one): bad input, named.
    for must_exist in (False, True):
        with pytest.raises(StorageInputError, match="is a file, not a directory") as info:
            check_access(resolve(tmp_path / "file"), must_exist=must_exist)
        assert str(info.value) == f"{resolve(tmp_path / 'file').uri} is a file, not a directory"
    check_access(resolve(tmp_path), must_exist=True)


# --------------------------------------------------------------------------- endpoint, URIs


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    config = StorageConfig(endpoint_url="http://from-config:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://from-s3-env:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:2")
    assert s3_endpoint(config) == "http://from-s3-env:1"
    assert resolve("s3://bucket/x", config).endpoint == "http://from-s3-env:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert s3_endpoint(config) == "http://from-env:2"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert s3_endpoint(config) == "http://from-config:9000"
    assert resolve("s3://bucket/x", config).endpoint == "http://from-config:9000"
    assert s3_endpoint(StorageConfig()) is None
    assert s3_endpoint(None) is None
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "   ")  # blank counts as unset
    assert s3_endpoint(config) == "http://from-config:9000"


def test_bad_endpoint_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "localhost:9000")
    with pytest.raises(StorageError, match="is not a URL"):
        resolve("s3://bucket/x")


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("gs://bucket/x", "unsupported storage URI scheme 'gs://'"),
        ("http://host/x", "unsupported storage URI scheme 'http://'"),
        ("hdfs://nn/x", "unsupported"),
        ("", "empty storage URI"),
        ("   ", "empty storage URI"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3:bucket/x", "malformed"),
        ("s3://ab/x", "3 to 63 characters"),
        ("s3://" + "a" * 64, "3 to 63 characters"),
        ("s3://My_Bucket/x", "lowercase"),
        ("s3://a..b/x", "'..'"),
        ("s3://-bucket/x", "begin and end"),
        ("s3://192.168.1.1/x", "IP address"),
        ("s3://bucket/a/../b", "'..'"),
        ("file://otherhost/x", "names host"),
    ],
)
def test_bad_uris(uri: str, match: str) -> None:
    with pytest.raises(StorageError, match=match):
        resolve(uri)


def test_credentials_in_uri_are_refused_and_hidden() -> None:
    key_id, secret = "AKID" + "SECRETID", "TopSecret" + "Value42"  # not one literal in a traceback
    with pytest.raises(StorageError, match="must not carry credentials") as info:
        resolve(f"s3://{key_id}:{secret}@bucket/x")
    _assert_no_secrets(info.value, key_id, secret)


def test_storage_error_scrubs_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t/with+chars")
    error = StorageError("failed with AKIAEXAMPLEKEY and s3cr3t/with+chars; password=hunter22")
    _assert_no_secrets(error, "AKIAEXAMPLEKEY", "s3cr3t/with+chars", "hunter22")
    assert "failed with" in str(error)
    assert scrub("secret_key='abc123def'") == "secret_key='***'"  # one scrubber, one marker
