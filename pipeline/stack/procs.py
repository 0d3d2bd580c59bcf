"""The one process and port toolkit of the local servers, the stack and the test clusters.

Ports: free ones on a host (:func:`free_port`, :func:`free_ports`), free on every interface too
(:func:`free_port_everywhere`: Ray binds some of its ports on all interfaces), and
:func:`listening`. Processes (Linux ``/proc``; ``ps`` as a fallback for command lines):
start times (a pid is only ever signalled together with the start time it had when first
seen, so a recycled pid is never hit), process trees, :func:`terminate_tree` (SIGTERM, wait,
then SIGKILL) for a detached service and :func:`stop_group` for a child in its own process
group. Plus the small helpers around them: :func:`find_executable`, :func:`log_tail`,
:func:`http_get`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = [
    "ServerError",
    "alive",
    "cmdline",
    "find_executable",
    "free_port",
    "free_port_everywhere",
    "free_ports",
    "group_alive",
    "http_get",
    "http_status",
    "listening",
    "log_tail",
    "port_is_free",
    "process_tree",
    "signal_known",
    "start_time",
    "stop_group",
    "terminate_tree",
    "wait_gone",
]

LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """A server did not start (or stop), or a program it needs is missing; the message says
    why (for a failed start: the tail of its log)."""


# --------------------------------------------------------------------------- ports


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports on ``host`` that nothing listens on right now (all held
    open together while chosen, so no duplicates)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            held.append(sock)
        return [s.getsockname()[1] for s in held]
    finally:
        for sock in held:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    return free_ports(1, host)[0]


def port_is_free(port: int, host: str = "") -> bool:
    """Nothing listens on ``port`` on ``host`` (default ``""``: on any interface, since Ray
    binds some ports on 0.0.0.0 and the rest of the stack on 127.0.0.1). A port in TIME_WAIT
    counts as free (the servers here set SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_everywhere(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` and on every interface (see :func:`port_is_free`)."""
    while True:
        port = free_port(host)
        if port_is_free(port):
            return port


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onward), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Process start time in clock ticks since boot (Linux), None elsewhere or when gone."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ("" when gone)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        pass
    try:  # not Linux
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def alive(pid: int, started: int | None = None) -> bool:
    """``pid`` runs (a zombie counts as gone; a zombie child of ours is reaped) and, when
    ``started`` is given, it is still the process that started then."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields and fields[0] == "Z":
        return False
    return started is None or start_time(pid) in (None, started)


def group_alive(pgid: int) -> bool:
    """Some process of process group ``pgid`` still runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _all_stats() -> dict[int, list[str]]:
    stats: dict[int, list[str]] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _proc_stat(int(entry.name))
                if fields:
                    stats[int(entry.name)] = fields
    return stats


def process_tree(pid: int) -> dict[int, int | None]:
    """``pid``, every process below it and every member of its process group, each with its
    start time (so that a pid recycled later is never signalled). Empty of descendants where
    there is no /proc."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    found += [p for p, fields in stats.items() if int(fields[2]) == pid]  # its group
    return {p: start_time(p) for p in dict.fromkeys(found)}


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for ``pids`` to end; returns those still running."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def signal_known(procs: dict[int, int | None], sig: int) -> list[int]:
    """Send ``sig`` to each process of ``procs`` still running with its recorded start
    time; returns the ones signalled."""
    hit = []
    for pid, started in procs.items():
        if alive(pid) and start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                hit.append(pid)
    return hit


def terminate_tree(pid: int, timeout: float, *, leader_only: bool = False) -> None:
    """Stop a detached service whose leader ``pid`` we started with ``setsid``: SIGTERM
    (to its process group, or to the leader alone with ``leader_only``: ``ray start --block``
    shuts its node down itself), wait up to ``timeout`` s, then SIGKILL the group while the
    leader lives (the group is still ours then); afterwards whatever of the tree seen before
    the first signal is left, by pid and start time (Ray's workers run in sessions of their
    own). The caller checks that ``pid`` is the process it started."""
    procs = process_tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if leader_only:
            os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(pid, signal.SIGTERM)
    if wait_gone([pid], timeout):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        wait_gone([pid], 10.0)
    left = wait_gone(list(procs), 5.0 if signal_known(procs, signal.SIGTERM) else 0.0)
    if left:
        signal_known({p: procs[p] for p in left}, signal.SIGKILL)
        wait_gone(left, 5.0)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a child started with ``start_new_session=True``: SIGTERM to its process group,
    wait up to ``timeout`` s, then SIGKILL; then whatever is left in the group (e.g. MLflow's
    worker processes) goes too, within 3 s."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
    deadline = time.monotonic() + 3.0
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------- small helpers


def find_executable(name: str) -> str:
    """``name`` next to the running Python (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise ServerError(f"'{name}' not found next to {sys.executable} nor on PATH")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the log at ``path`` ("(no log)" when it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int | None, str]:
    """(status, body) of a GET, or (None, '') when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except (urllib.error.URLError, OSError):
        return None, ""


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status ``url`` answers with, or None when nothing answers."""
    return http_get(url, timeout=timeout)[0]
