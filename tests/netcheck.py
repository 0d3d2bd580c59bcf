"""Listening sockets of a set of processes, and whether each refuses a caller without Ray's
token: the check behind "every listener is loopback or token-guarded" (tests/test_stack.py
for the local stack, tests/test_failures.py for the local Ray of the jobs).

Imported as ``from netcheck import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pipeline.stack.procs import http_get

__all__ = ["_decode_address", "_is_loopback", "_listeners", "_refuses_without_token", "exposed"]


def _decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that one of ``pids`` holds:
    socket inodes from /proc/<pid>/fd matched against /proc/net/tcp and tcp6."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # gone meanwhile
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[len("socket:[") : -1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            address = _decode_address(hex_address)
            found.append((str(address), int(hex_port, 16), inodes[fields[9]]))
    return found


def _refuses_without_token(port: int) -> bool:
    """A request without the token is refused: HTTP 401/403, or gRPC UNAUTHENTICATED for
    the Ray services a port may serve (Ray's token auth on GCS, raylet and agents)."""
    status, _ = http_get(f"http://127.0.0.1:{port}/", timeout=3.0)
    if status in (401, 403):
        return True
    import grpc

    methods = (
        "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
        "/ray.rpc.NodeManagerService/GetNodeStats",
        "/ray.rpc.ObjectManagerService/FreeObjects",
        "/ray.rpc.LogService/ListLogs",
        "/ray.rpc.ReporterService/GetTraceback",
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method in methods:
            call = channel.unary_unary(
                method, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            try:
                call(b"", timeout=3.0)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return True
                continue
            return False  # answered without a token
    return False


def exposed(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of the listeners of ``pids`` beyond loopback that answer a caller
    without the token (empty: all loopback or token-guarded)."""
    return [
        (address, port, pid)
        for address, port, pid in _listeners(pids)
        if not _is_loopback(ipaddress.ip_address(address)) and not _refuses_without_token(port)
    ]
