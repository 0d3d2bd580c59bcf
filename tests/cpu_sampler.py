"""Where a command's CPU goes, by process: the method of docs/benchmarks.md, "The test suite".

Not a test (pytest collects ``test_*.py`` only): a tool for the next accounting of the suite.

    python tests/cpu_sampler.py -- .venv/bin/python -m pytest -n 2 --dist loadfile -m "not serial"

runs the command and, every ``--every`` seconds while it runs, reads each process's CPU ticks
(``utime + stime``, /proc/<pid>/stat) and keeps the last value per process; at the end it
prints the machine's CPU seconds over the run (/proc/stat) and the processes' CPU seconds
grouped by name (Ray names its workers ``ray::<Actor>``; other processes by program).
Processes that lived before the command (kernel threads, daemons) are left out, and any
other process started meanwhile is counted: run it on a quiet machine. Processes
shorter than one interval are missed, so the groups add up to a little less than the
machine's total. Linux only.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> int:
    """CPU ticks the machine spent busy so far (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return fields[0] + fields[1] + fields[2] + fields[5] + fields[6]


def read_process(pid: str) -> tuple[str, int] | None:
    """(name, cumulative CPU ticks) of one process, or None if it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, int(fields[11]) + int(fields[12])


def group_of(name: str, pid: str) -> str:
    """A process's group: its Ray actor name, or its program (script or module)."""
    if name.startswith("ray::"):
        return name
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
    except OSError:
        return name
    words = [a.decode(errors="replace") for a in argv if a]
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            return f"{name} -m {words[i + 1]}"
        if word.endswith(".py"):
            return f"{name} {os.path.basename(word)}"
    return name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--top", type=int, default=40, help="groups to print")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")

    before = {pid for pid in os.listdir("/proc") if pid.isdigit()}
    last: dict[str, list] = {}  # pid -> [name, ticks, group]
    start_ticks, start = machine_ticks(), time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in before:
                continue
            seen = read_process(pid)
            if seen is None:
                continue
            name, ticks = seen
            entry = last.get(pid)
            if entry is None or ticks < entry[1]:  # new, or the pid was reused
                last[pid] = [name, ticks, group_of(name, pid)]
            else:
                entry[1] = ticks
                if name.startswith("ray::"):  # an idle Ray worker that became an actor
                    entry[2] = name
        time.sleep(args.every)
    wall = time.monotonic() - start
    total = (machine_ticks() - start_ticks) / TICKS_PER_S

    seconds: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for _name, ticks, group in last.values():
        seconds[group] += ticks / TICKS_PER_S
        count[group] += 1
    attributed = sum(seconds.values())
    print(f"\nmachine: {total:,.0f} CPU-s in {wall:,.0f} s of wall ({total / wall:.2f} cores busy)")
    print(f"processes started meanwhile: {attributed:,.0f} CPU-s")
    for group, cpu in seconds.most_common(args.top):
        print(f"{cpu:8.1f} CPU-s {count[group]:5d} processes  {group}")
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
