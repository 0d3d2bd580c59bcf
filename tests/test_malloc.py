"""pipeline.rayenv.keep_freed_memory: freed heap memory stays mapped; repeated allocations
stop faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.rayenv import keep_freed_memory

# A step-like loop on a second thread (where Ray Data and Ray Train run user code): 20
# forward passes of a small conv net on a batch of 50 (activations of ~3 MiB, allocated and
# freed each pass); print the minor page faults they took.
_LOOP = """
import resource, sys, threading
import torch
from pipeline.rayenv import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
net = torch.nn.Sequential(
    torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 16, 3, padding=1)
)
x = torch.randn(50, 16, 32, 32)
def loop():
    with torch.no_grad():
        net(x)  # warm-up: the first pass faults its pages in any case
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            net(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
worker = threading.Thread(target=loop)
worker.start()
worker.join()
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_the_per_allocation_faults():
    default, kept = _faults("default"), _faults("keep")
    # By default the freed activations go back to the kernel and every pass faults them in
    # again (thousands of 4 KiB pages per pass); kept, the passes reuse the same pages.
    assert default > 20 * 500, (default, kept)
    assert kept * 50 < default, (default, kept)


def test_keep_freed_memory_applies_once_per_process(monkeypatch: pytest.MonkeyPatch):
    """Callers may call it on every shard or step: the mallopt calls happen only once."""
    from pipeline import rayenv

    calls: list[int] = []
    monkeypatch.setattr(rayenv, "_malloc_applied", None)
    monkeypatch.setattr(rayenv, "_apply_mallopt", lambda: calls.append(1) or True)
    assert keep_freed_memory() and keep_freed_memory()
    assert calls == [1]
