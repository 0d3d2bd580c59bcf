"""The console filter for Ray's C++ notices, on a real file descriptor 2 (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.rayenv import CHATTY_LOGGERS, quiet_library_loggers, scoped_environ

NOTICE = (
    "[2026-11-29 01:38:37,419 E 30079 30079] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(SamplerActor))' and ID: 'f7554c' has constructor arguments in the "
    "object store and max_restarts > 0. If the arguments in the object store go out of scope "
    "or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727"
)

SCRIPT = f"""
import os, sys, time
from pipeline.rayenv import quiet_cpp_notices
print("before", file=sys.stderr, flush=True)
with quiet_cpp_notices():
    os.write(2, b"first line\\n")
    os.write(2, {NOTICE!r}.encode() + b"\\n")
    os.write(2, b"[2026-11-29 01:38:38,000 W 1 1] other.cc:1: a real C++ warning\\n")
    os.write(2, b"\\rRunning 50%")  # a progress bar: no newline
    time.sleep(0.5)
    print("python stderr", file=sys.stderr, flush=True)
    os.write(2, b"[half a C++ li")  # split across writes: held until its end arrives
    os.write(2, b"ne] core_worker.cc:1: the end\\n")
print("after", file=sys.stderr, flush=True)
raise SystemExit(3)
"""


def test_quiet_cpp_notices_drops_only_the_notice_and_keeps_order(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 3
    err = done.stderr.decode()  # bytes: text mode would turn the progress bar's \r into \n
    assert "53727" not in err and "constructor arguments" not in err
    expected = [
        "before\n",
        "first line\n",
        "[2026-11-29 01:38:38,000 W 1 1] other.cc:1: a real C++ warning\n",
        "\rRunning 50%",
        "python stderr\n",
        "[half a C++ line] core_worker.cc:1: the end\n",
        "after\n",
    ]
    assert err == "".join(expected), err


def test_quiet_cpp_notices_passes_a_progress_bar_on_at_once(tmp_path):
    """A partial line (no newline yet) reaches the console while the block still runs."""
    script = """
import os, sys, time
from pipeline.rayenv import quiet_cpp_notices
with quiet_cpp_notices():
    os.write(2, b"\\rRunning 10%")
    time.sleep(30)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        seen = b""
        while len(seen) < len(b"\rRunning 10%"):
            chunk = proc.stderr.read1(64)
            assert chunk, "stderr closed before the progress bar arrived"
            seen += chunk
        assert seen == b"\rRunning 10%"
        assert proc.poll() is None  # still inside the block: it was not held back
    finally:
        proc.kill()
        proc.wait()


def test_quiet_cpp_notices_overlapping_users_share_one_filter(tmp_path):
    """Two threads whose blocks overlap out of order: the notice is dropped while either is
    inside, and fd 2 is the original one again once both are out."""
    script = f"""
import os, threading
from pipeline.rayenv import quiet_cpp_notices
original = os.fstat(2).st_ino
a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
def a():
    with quiet_cpp_notices():
        a_in.set(); b_in.wait()
        os.write(2, b"a inside\\n")
    a_out.set()
def b():
    a_in.wait()
    with quiet_cpp_notices():
        b_in.set(); a_out.wait()
        os.write(2, {NOTICE!r}.encode() + b"\\n")  # only b is inside now
        os.write(2, b"b inside\\n")
threads = [threading.Thread(target=a), threading.Thread(target=b)]
[t.start() for t in threads]; [t.join() for t in threads]
assert os.fstat(2).st_ino == original, "fd 2 was not restored"
os.write(2, b"both out\\n")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode() == "a inside\nb inside\nboth out\n"


def test_scoped_environ_sets_and_unsets_then_restores_exactly(monkeypatch):
    """Ray workers inherit os.environ at ray.init, so the S3 settings must be in it then;
    the submitter must hide RAY_ADDRESS. Either way the caller's environment comes back."""
    monkeypatch.setenv("FMPIPE_TEST_KEEP", "kept")
    monkeypatch.setenv("FMPIPE_TEST_HIDE", "shown")
    monkeypatch.delenv("FMPIPE_TEST_NEW", raising=False)
    with pytest.raises(RuntimeError), scoped_environ({"FMPIPE_TEST_NEW": "1",
                                                       "FMPIPE_TEST_KEEP": "changed"},
                                                      unset=["FMPIPE_TEST_HIDE"]):  # fmt: skip
        assert os.environ["FMPIPE_TEST_NEW"] == "1"
        assert os.environ["FMPIPE_TEST_KEEP"] == "changed"
        assert "FMPIPE_TEST_HIDE" not in os.environ
        raise RuntimeError("the block failed")
    assert "FMPIPE_TEST_NEW" not in os.environ
    assert os.environ["FMPIPE_TEST_KEEP"] == "kept"
    assert os.environ["FMPIPE_TEST_HIDE"] == "shown"


def test_quiet_library_loggers_keeps_info_lines_off_the_console(monkeypatch):
    """Without it, botocore/mlflow/ray INFO records reach a job's console handler."""
    import logging

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)  # a job's basicConfig
    for name in CHATTY_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    assert all(logging.getLogger(name).isEnabledFor(logging.INFO) for name in CHATTY_LOGGERS)
    quiet_library_loggers()
    for name in CHATTY_LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"


RETRY_SCRIPT = """
import subprocess, sys
import ray
from pipeline import rayenv

server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
real_init, calls, left = ray.init, [], []

def init_that_times_out_once(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:  # what a raylet that missed its 30 s window leaves: live children
        left.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        raise Exception("The current node timed out during startup. This could happen ...")
    return real_init(*args, **kwargs)

ray.init = init_that_times_out_once
started = rayenv.ensure_ray(num_cpus=1)
print("started", started, "calls", len(calls), "up", ray.is_initialized(),
      "left killed", left[0].wait(timeout=10) is not None, "server alive", server.poll() is None)
ray.shutdown()
server.kill()
"""


def test_a_local_ray_that_times_out_at_startup_is_started_again(tmp_path):
    """Ray's fixed 30 s raylet registration window, missed once on a loaded machine: the
    processes that start left are killed (a caller's own servers are not) and one more start
    succeeds."""
    done = subprocess.run([sys.executable, "-c", RETRY_SCRIPT], capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started True calls 2 up True left killed True server alive True" in done.stdout, (
        done.stdout,
        done.stderr[-2000:],
    )


WATCHER_SCRIPT = """
import os, ray
from ray._private import state
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from pipeline import rayenv

def actor_classes():
    return sorted(a["ActorClassName"] for a in state.actors().values())

def run(name):
    trainer = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name=name, storage_path=os.getcwd()))
    with rayenv.scoped_environ(rayenv.train_environ()):
        trainer.fit()

rayenv.ensure_ray(num_cpus=2)
print("local", rayenv.on_local_ray(), rayenv.train_environ())
run("default")
print("after default", [c for c in actor_classes() if "Preemption" in c])
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # the user's choice is kept
print("user set", rayenv.train_environ())
run("user")
print("after user", [c for c in actor_classes() if "Preemption" in c])
ray.shutdown()
print("shut down", rayenv.on_local_ray(), rayenv.train_environ())
"""


def test_a_local_ray_trains_without_a_preemption_watcher_unless_the_user_asks(tmp_path):
    """The Ray that ensure_ray starts is one machine nothing drains: a Ray Train run on it
    starts no PreemptionWatcher actor (one process fewer per run); a user who sets
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER gets theirs (which shows the check can see one)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"}
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    done = subprocess.run(
        [sys.executable, "-c", WATCHER_SCRIPT],
        capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "local True {'RAY_TRAIN_ENABLE_PREEMPTION_WATCHER': '0'}" in lines, done.stdout
    assert "after default []" in lines, done.stdout
    assert "user set {}" in lines, done.stdout
    assert "after user ['PreemptionWatcher']" in lines, done.stdout
    assert "shut down False {}" in lines, done.stdout


SIGINT_SCRIPT = """
import sys, time
from pipeline.rayenv import ctrl_c_raises
if sys.argv[1] == "fix":
    ctrl_c_raises()
try:  # "ready" inside the try: a SIGINT right after it is still caught here
    print("ready", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    raise SystemExit(130)
print("slept to the end", flush=True)
"""


@pytest.mark.parametrize("inherited", ["ignored", "blocked"])
def test_ctrl_c_raises_even_where_the_parent_ignored_or_blocked_sigint(inherited, tmp_path):
    """A child started with SIGINT ignored or blocked (as `job &` in a script starts it)
    sleeps through a SIGINT; after ctrl_c_raises() the same SIGINT interrupts it."""
    import signal

    def inherit() -> None:
        if inherited == "ignored":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    outcomes = {}
    for mode in ("plain", "fix"):
        proc = subprocess.Popen(
            [sys.executable, "-c", SIGINT_SCRIPT, mode], stdout=subprocess.PIPE, text=True,
            cwd=tmp_path, preexec_fn=inherit,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        try:
            # well before the 60 s sleep ends; the fixed child gets long enough to exit on a
            # loaded machine (2 s was missed once beside the other pytest worker)
            out, _ = proc.communicate(timeout=5 if mode == "plain" else 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += "still sleeping"
        outcomes[mode] = (proc.returncode, out.strip())
    assert outcomes["plain"][1] == "still sleeping"  # the condition the fix is for
    assert outcomes["fix"] == (130, "interrupted")


DRIVER_MESSAGES_SCRIPT = """
import glob, os, sys, time
import ray._private.worker as ray_worker
from jobs._common import run_job
from pipeline import rayenv

def crash_once(marker):
    @ray.remote(max_retries=1)
    def task():
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker dies; Ray retries the task
        return 1
    return ray.get(task.remote())

def logged(text):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(text in open(p).read() for p in glob.glob(os.environ["FMPIPE_HOME"] + "/logs/*")):
            return True
        time.sleep(0.5)
    return False

def body():
    global ray
    original = ray_worker.print_to_stdstream
    rayenv.ensure_ray(num_cpus=1)
    import ray
    print("routed task", crash_once("routed"), flush=True)
    print("in the job log", logged("(raylet) A worker died"), flush=True)
    ray_worker.print_to_stdstream = original  # Ray's own printer: the message reaches stdout
    print("restored", flush=True)
    print("plain task", crash_once("plain"), flush=True)
    time.sleep(5)  # the pushed message arrives after the retried task's result
    print("end", flush=True)
    ray.shutdown()
    return 0

sys.exit(run_job(body, "messages"))
"""


def test_ray_messages_pushed_to_the_driver_go_to_the_job_log_not_the_console(tmp_path):
    """A task whose worker dies is retried by Ray, which pushes "(raylet) A worker died ..."
    and "Task ... failed. There are 1 retries remaining" to the driver: under ensure_ray they
    are in the job's log file and not on the console; with Ray's own printer back they are
    on stdout (the condition the routing is for)."""
    env = {**os.environ, "FMPIPE_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER_MESSAGES_SCRIPT],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    routed, plain = out.split("restored")
    assert "routed task 1" in routed and "in the job log True" in routed, out
    assert "A worker died" not in routed + done.stderr, out + done.stderr
    assert "A worker died" in plain and "retries remaining" in plain, out
