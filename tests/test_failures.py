"""How jobs fail (issue 17): one line on stderr, an exit code a scheduler can act on, the
traceback in a log file; Ctrl-C; S3 down and disk full during sampling; the local Ray's ports.

Exit codes (jobs/_failures.py): 2 bad input, 130 interrupted, 1 anything else. The subprocess
tests run the real `python -m jobs.<name>` against real parts: a SeaweedFS of their own (so it
can be killed), a tmpfs of a few hundred KiB (a disk that really fills up), local Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from localray import TRAIN_POLL_S
from netcheck import _listeners, exposed
from tiny import tiny_checkpoint, tiny_unet_overrides

from jobs import train as train_job
from jobs._common import run_job
from jobs._failures import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    describe_failure,
    exit_code_of,
    root_cause,
)
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError
from pipeline.data.stream import DatasetError
from pipeline.registry import ModelNotFound
from pipeline.sample.plan import SampleJobError
from pipeline.storage import StorageError, StorageInputError

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-" + uuid.uuid4().hex  # must never reach a line or a log file

# Variables of the test process that must not steer the jobs' own Ray, S3 or MLflow.
_CLEARED = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
)


def job_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(
        PYTHONPATH=str(REPO),
        FMPIPE_HOME=str(home),
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=TRAIN_POLL_S,  # checkpoints are registered promptly
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Job:
    """``python -m jobs.<name> ...`` in its own session (process group), as a terminal runs
    it; stdout read line by line (to wait for a progress line), stderr kept whole."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.stderr_file = log.with_suffix(".stderr")
        self.lines: list[str] = []
        self.pending = b""
        with open(self.stderr_file, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *argv],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self.selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)

    def _read(self, timeout: float) -> bool:
        """Read what stdout has within ``timeout`` into ``lines``; False at end of stream."""
        assert self.proc.stdout is not None
        if not self.selector.select(timeout=timeout):
            return True
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            return False
        *complete, self.pending = (self.pending + chunk).split(b"\n")
        self.lines += [line.decode(errors="replace") for line in complete]
        return True

    def wait_for(self, needle: str, timeout: float) -> str:
        """The first stdout line containing ``needle`` (fails on exit or timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if needle in line:
                    return line
            if not self._read(1.0):
                break
        raise AssertionError(
            f"no line with {needle!r} (rc={self.proc.poll()}):\n" + self.output()[-6000:]
        )

    def interrupt(self) -> None:
        """SIGINT to the whole process group, as Ctrl-C in a terminal sends it."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float) -> tuple[int, str]:
        """(exit code, stderr) once the job ends; kills the group if it does not."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and self._read(1.0):
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
                message = f"job still running after {timeout} s:\n{self.output()[-6000:]}"
                raise AssertionError(message)
        self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        before = -1
        while len(self.lines) != before and self._read(0.5):  # what is left in the pipe
            before = len(self.lines)
        if self.pending:
            self.lines.append(self.pending.decode(errors="replace"))
            self.pending = b""
        return self.proc.returncode, self.stderr()

    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + self.stderr()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def fmpipe_lines(stderr: str, job: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"fmpipe {job}:")]


def assert_one_line(stderr: str, job: str) -> str:
    """stderr ends in exactly one ``fmpipe <job>:`` line and holds no traceback."""
    lines = fmpipe_lines(stderr, job)
    assert len(lines) == 1, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert stderr.strip().splitlines()[-1] == lines[0], stderr[-4000:]
    return lines[0]


# --------------------------------------------------------------------------- classification
def _ray_task_error(cause: BaseException) -> BaseException:
    """What Ray raises in the driver for an actor's or task's error: a ``RayTaskError``
    subclassing the cause's class, its traceback text in the message."""
    from ray.exceptions import RayTaskError

    return RayTaskError(
        "SamplerActor.__call__", "Traceback (most recent call last):\n  ...\n", cause
    ).as_instanceof_cause()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("train.lr: bad"), EXIT_BAD_INPUT),
        (DatasetError("dataset 'x' has no manifest"), EXIT_BAD_INPUT),
        (ModelNotFound("registered model 'nope' does not exist"), EXIT_BAD_INPUT),
        (CheckpointError("checkpoint x: state.json is missing"), EXIT_BAD_INPUT),
        (SampleJobError("sample.label=7 is not a class"), EXIT_BAD_INPUT),
        (StorageError("cannot reach S3 at http://127.0.0.1:1"), EXIT_FAILED),
        (StorageInputError("bucket 'nope' does not exist (s3://nope/x)"), EXIT_BAD_INPUT),
        (OSError(28, "No space left on device"), EXIT_FAILED),
        (RuntimeError("boom"), EXIT_FAILED),
        (KeyboardInterrupt(), EXIT_INTERRUPTED),
    ],
)
def test_exit_code_by_kind_of_error(error: BaseException, code: int) -> None:
    assert exit_code_of(error) == code
    if isinstance(error, Exception):  # as an actor's error reaches the driver
        assert exit_code_of(_ray_task_error(error)) == code


def test_ray_wrappers_come_off_for_the_line() -> None:
    """A worker's error reaches the driver inside WorkerGroupError (Ray Train) or a
    RayTaskError (Ray Data): the line names the root cause, on one line, with the hint."""
    from ray.train import WorkerGroupError

    cause = DatasetError("shard-000003.tar of /data/train: sha256 mismatch")
    wrapped = WorkerGroupError("Worker 0 failed:\nTraceback ...\n" + "x" * 5000, {0: cause})
    assert root_cause(wrapped) is cause and exit_code_of(wrapped) == EXIT_BAD_INPUT
    ending = describe_failure("train", wrapped, retry_hint="re-run to resume")
    assert ending.code == 2 and "\n" not in ending.line
    assert ending.line == (
        "fmpipe train: error: in training worker 0: shard-000003.tar of /data/train: "
        "sha256 mismatch"
    )  # bad input: no "re-run" advice, which would fail the same way

    down = _ray_task_error(
        StorageError("cannot write s3://b/shard-000001.tar: EndpointConnectionError")
    )
    ending = describe_failure(
        "sample", down, retry_hint="re-run the same command", log_path=Path("/l")
    )
    assert ending.code == 1
    assert ending.line == (
        "fmpipe sample: error: in a Ray worker: cannot write s3://b/shard-000001.tar: "
        "EndpointConnectionError; re-run the same command (details: /l)"
    )


def test_a_jobs_bad_input_class_is_said_as_its_own_text() -> None:
    """A builtin error that a job declares bad input (``fmpipe prepare``'s sources refuse a
    spec with ValueError) is the user's input: its text alone, exit 2; the same class from
    a job that does not declare it keeps its name in front (it says what kind of error)."""
    error = ValueError("unknown source 'mnist'; allowed forms: digits, folder:PATH")
    ending = describe_failure("prepare", error, retry_hint="re-run", bad_input=(ValueError,))
    assert ending.code == EXIT_BAD_INPUT
    assert ending.line == (
        "fmpipe prepare: error: unknown source 'mnist'; allowed forms: digits, folder:PATH"
    )
    ending = describe_failure("train", error, retry_hint="re-run")
    assert ending.code == EXIT_FAILED
    assert ending.line == (
        "fmpipe train: error: ValueError: unknown source 'mnist'; allowed forms: digits, "
        "folder:PATH; re-run"
    )


def test_ray_data_error_is_named_by_its_cause_from_the_worker_traceback() -> None:
    """Ray Data re-raises a map function's error as UserCodeException "from" it; only the
    traceback text of that chain reaches the driver: the line names the real error."""
    from ray.exceptions import RayTaskError, UserCodeException

    text = (
        "Traceback (most recent call last):\n  File ...\n"
        "pipeline.storage.StorageError: cannot write /d/out/shard-000003.tar: OSError: "
        "[Errno 28] No space left on device\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n  ...\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    )
    error = RayTaskError(
        "MapWorker.submit", text, UserCodeException("UDF failed to process a data block.")
    ).as_instanceof_cause()
    ending = describe_failure("sample", error, retry_hint="re-run")
    assert ending.code == EXIT_FAILED
    assert ending.line == (
        "fmpipe sample: error: in a Ray worker: cannot write /d/out/shard-000003.tar: OSError: "
        "[Errno 28] No space left on device; re-run"
    )
    bad = RayTaskError(
        "MapWorker.submit",
        text.replace("pipeline.storage.StorageError", "pipeline.data.stream.DatasetError"),
        UserCodeException("UDF failed to process a data block."),
    ).as_instanceof_cause()
    assert exit_code_of(bad) == EXIT_BAD_INPUT


def test_unexpected_error_is_one_line_and_the_traceback_goes_to_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FMPIPE_TEST_SECRET", SECRET)

    def nested() -> None:
        raise RuntimeError(f"the step broke, key {SECRET}\nsecond line")

    def body() -> int:
        nested()
        return 0

    code = run_job(body, "probe")
    err = capsys.readouterr().err
    line = assert_one_line(err, "probe")
    assert code == EXIT_FAILED
    assert line.startswith("fmpipe probe: error: RuntimeError: the step broke, key *** second")
    logs = list((tmp_path / "home" / "logs").glob("probe-*.log"))
    assert len(logs) == 1 and f"(details: {logs[0]})" in line
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "in nested" in text
    assert SECRET not in text + err


def test_config_error_stays_one_line_without_a_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    code = train_job.main(["train.no_such_key=1"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1 and err.startswith("config error: ")
    assert not (tmp_path / "home" / "logs").exists()


def test_workers_that_do_not_split_the_batch_fail_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--workers 3` with the default batch of 128: one line, exit 2, before Ray or a run."""
    import ray

    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    code = train_job.main(["--workers", "3", "--storage", str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "data.batch_size=128" in captured.err and "train.num_workers" in captured.err
    assert "--workers" in captured.err  # what to change
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
    assert captured.out == ""  # not even the start line


def test_a_network_that_does_not_fit_the_data_fails_before_any_work(
    digits8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Attention at a size the U-Net never has (8x8 digits: sizes 8 and 4): one line naming
    the key, the sizes and the data's shape, exit 2, before Ray, an MLflow run or a run
    folder; no worker tries (and retries) to build it."""
    import ray

    home, runs = tmp_path / "home", tmp_path / "runs"
    monkeypatch.setenv("FMPIPE_HOME", str(home))
    argv = _train_argv(digits8, runs)
    overrides = [a for a in argv if not a.startswith("model.attention_resolutions=")]
    code = train_job.main([*overrides[1:], "model.attention_resolutions=[2]"])
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    for part in ("attention_resolutions contains 2", "sizes are [8, 4]", "(1, 8, 8)"):
        assert part in captured.err, captured.err
    assert not ray.is_initialized() and not runs.exists()
    assert not (home / "mlflow.db").exists() and "MLflow run" not in captured.out


# --------------------------------------------------------------------------- local Ray ports
def test_local_ray_serves_nothing_beyond_loopback_without_the_token(tmp_path: Path) -> None:
    """Item 9: every port of a Ray that ensure_ray starts is loopback or refuses a caller
    without the token; the metrics ports (no token there) are loopback."""
    from pipeline.stack.procs import process_tree

    token = tmp_path / "token"
    token.write_text(uuid.uuid4().hex)
    token.chmod(0o600)
    code = (
        "import sys, json, ray\n"
        "from pipeline.rayenv import ensure_ray\n"
        "ensure_ray(num_cpus=1)\n"
        "ray.get(ray.remote(lambda: 1).remote())\n"  # a worker up too
        "node = ray._private.worker._global_node\n"
        "print(json.dumps({'metrics': node.metrics_export_port}), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    env = job_env(tmp_path / "home", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, proc.communicate(timeout=60)[1].decode()[-3000:]
        metrics_port = json.loads(first)["metrics"]
        time.sleep(2)  # the agents and the autoscaler open their ports after start-up
        pids = set(process_tree(proc.pid))
        listeners = _listeners(pids)
        assert len(listeners) >= 4, listeners  # GCS, raylet, object manager, agents, ...
        assert exposed(pids) == [], f"answering beyond loopback without the token: {listeners}"
        by_port = {port: address for address, port, _ in listeners}
        assert by_port.get(metrics_port) in ("127.0.0.1", "::ffff:127.0.0.1"), listeners
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


# --------------------------------------------------------------------------- Ctrl-C in train
@pytest.fixture(scope="module")
def digits8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits dataset at 8x8 (what `fmpipe prepare` writes), once for the module."""
    from pipeline.config import build_config
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("digits8") / "digits"
    cfg = build_config({"prepare": {"source": "digits", "out": str(out), "resolution": 8}})
    prepare_dataset(cfg, log=None)
    return out


def _train_argv(data: Path, runs: Path) -> list[str]:
    return [
        "jobs.train",
        "--data", str(data), "--storage", str(runs), "--run-name", "ctrl-c",
        "--images", "1000000",  # far more than the test waits for
        "data.resolution=8", "data.batch_size=16",
        *tiny_unet_overrides(),
        "train.cpus_per_worker=1", "train.torch_threads=1",
        "train.checkpoint_every_images=64", "train.log_every_steps=1000",
        "train.val_every_images=1000000000", "train.grid_every_images=1000000000",
    ]  # fmt: skip


# Three job processes in turn, each allowed 400 s by its own waits: on a loaded 2-core machine
# the whole took 580 s once, too close to the suite's 900 s per test.
@pytest.mark.timeout(1800)
def test_ctrl_c_in_train_then_s3_killed_then_a_rerun_resumes_from_the_newest_complete(
    own_s3: object, digits8: Path, tmp_path: Path
) -> None:
    """Items 6 and 1, live, one run on SeaweedFS (checkpoints every 4 steps) met by two faults
    in turn, as a user would meet them:

    1. Ctrl-C (SIGINT to the process group) after a checkpoint: the documented line, exit
       130, the checkpoint it names complete (its state.json reads back).
    2. The same command resumes from it; the server is SIGKILLed right after the resumed
       run's next checkpoint line (while the next ones upload): one line, exit 1, no secret.
    3. The server restarts on its port and data; the re-run finds the newest complete
       checkpoint, resumes at exactly its images (weights, optimizer and data epoch from that
       one checkpoint) and finishes; its summary names the same point."""
    from pipeline.checkpoint import STATE_FILE, TrainState
    from pipeline.stack.servers import SeaweedFS
    from pipeline.storage import resolve
    from pipeline.train.resume import find_resume_point

    env = own_s3.env()  # type: ignore[attr-defined]
    bucket = "runs-" + uuid.uuid4().hex[:12]
    _client(own_s3).create_bucket(Bucket=bucket)
    home, storage = tmp_path / "home", f"s3://{bucket}/runs"
    argv = [*_train_argv(digits8, Path("unused")), "train.max_failures=0"]
    argv[argv.index("--storage") + 1] = storage

    job = Job(argv, _s3_env(own_s3, home), tmp_path / "train-1.log")
    try:
        job.wait_for("images  checkpoint", timeout=400)
        job.interrupt()
        code, err = job.finish(timeout=120)
    finally:
        job.kill()
    line = assert_one_line(err, "train")
    assert code == EXIT_INTERRUPTED, job.output()[-4000:]
    assert line.startswith(
        "fmpipe train: interrupted; re-run the same command to resume from checkpoint_"
    ), line
    name = line.split("resume from ", 1)[1].split(" ", 1)[0]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        state_json = resolve(f"{storage}/ctrl-c/{name}").child(STATE_FILE).read_bytes()
    state = TrainState.from_json(state_json.decode(), name)  # complete: it reads back
    assert state.images_seen >= 64 and f"({state.images_seen:,} images)" in line

    again = Job(argv, _s3_env(own_s3, home), tmp_path / "train-2.log")
    try:
        found = again.wait_for("found checkpoint_", timeout=400)
        resumed = again.wait_for("resuming at", timeout=400)
        again.wait_for("images  checkpoint", timeout=400)
        os.kill(own_s3.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        code, err = again.finish(timeout=400)
    finally:
        again.kill()
    assert "checkpoint_" in found and "starting" not in resumed, again.output()[-4000:]
    line = assert_one_line(err, "train")
    assert code == EXIT_FAILED, again.output()[-4000:]
    assert env["AWS_SECRET_ACCESS_KEY"] not in err + again.output()

    port = int(env["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1])
    restarted = SeaweedFS(tmp_path / "weed", s3_port=port)
    restarted.start()
    try:
        renv = _s3_env(restarted, home)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in restarted.env().items():
                patch.setenv(key, value)
            point = find_resume_point(resolve(f"{storage}/ctrl-c"))
        assert point is not None, line  # the checkpoint the line announced is complete
        seen = point.images_seen
        assert seen > state.images_seen  # the resumed run's own checkpoint, not the first
        total = seen + 64
        again_argv = list(argv)
        again_argv[again_argv.index("--images") + 1] = str(total)
        done = subprocess.run(
            [sys.executable, "-m", *again_argv], cwd=REPO, env=renv, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        (tmp_path / "train-3.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    finally:
        restarted.stop()
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert f"found {point.name} ({seen:,} images)" in out, out[-3000:]
    assert f"resuming at {seen:,} images" in out, out[-3000:]
    assert f"trained to {total:,} images" in out and f"(resumed at {seen:,})" in out, out[-3000:]


# --------------------------------------------------------------------------- sample failures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000000000064")


# 20 shards of one compute block each (50 samples on the CPU), 4 Euler steps: the job is
# still running when the fault comes (a shard took ~2 s on the loaded 2-core machine), and a
# re-run finishes in a minute.
SAMPLES, SHARD = 1000, 50


def _sample_argv(model: Path, out: str, steps: int = 4) -> list[str]:
    return [
        "jobs.sample", "--model", str(model), "--out", out, "--num-samples", str(SAMPLES),
        "--steps", str(steps), "--actors", "1", f"sample.shard_size={SHARD}",
    ]  # fmt: skip


def _check_shards(out_files: dict[str, bytes]) -> int:
    """Every shard present is complete and valid; returns how many there are."""
    from pipeline.sample.shards import check_shard

    for name, data in out_files.items():
        j = int(name.removeprefix("shard-").removesuffix(".tar"))
        check = check_shard(data, j * SHARD, (j + 1) * SHARD, True)
        assert check.ok, (name, check.problem)
    return len(out_files)


def _local_shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def _finish_and_check(argv: list[str], env: dict[str, str], log: Path, kept: int) -> str:
    """The same command again: exit 0, the kept shards reused, every sample there."""
    done = subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"{kept} of {SAMPLES // SHARD} shards already at" in done.stdout, done.stdout
    assert f"samples: {SAMPLES} in {SAMPLES // SHARD} shards" in done.stdout, done.stdout
    return done.stdout


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[object]:
    """A SeaweedFS of this test's own (the session's must not be killed), with a bucket."""
    from pipeline.stack.servers import SeaweedFS

    server = SeaweedFS(tmp_path / "weed")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _s3_env(server: object, home: Path) -> dict[str, str]:
    return job_env(home, **server.env())  # type: ignore[attr-defined]


def _client(server: object):
    """A boto3 S3 client of ``server`` (a test's own SeaweedFS, not the session's env)."""
    import boto3

    env = server.env()  # type: ignore[attr-defined]
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def _s3_shards(server: object, bucket: str) -> dict[str, bytes]:
    client = _client(server)
    listing = client.list_objects_v2(Bucket=bucket, Prefix="out/")
    names = sorted(o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".tar"))
    return {
        key.split("/")[-1]: client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for key in names
    }


def test_ctrl_c_then_s3_down_during_sample_keep_the_shards_and_a_rerun_completes(
    own_s3: object, checkpoint: Path, tmp_path: Path
) -> None:
    """Items 6 and 7, one sample job on SeaweedFS met by two faults in turn:

    1. Ctrl-C while the actors write: the documented line, exit 130, the complete shards kept.
    2. The same command writes only the missing shards; SeaweedFS is killed meanwhile: one
       line naming the output, exit 1, no secret; every shard written before stays valid.
    3. After a restart the same command reuses the kept shards and finishes with exactly N."""
    from pipeline.stack.servers import SeaweedFS

    env = own_s3.env()  # type: ignore[attr-defined]
    bucket = "samples-" + uuid.uuid4().hex[:12]
    _client(own_s3).create_bucket(Bucket=bucket)
    home = tmp_path / "home"
    argv = _sample_argv(checkpoint, f"s3://{bucket}/out", steps=32)
    job = Job(argv, _s3_env(own_s3, home), tmp_path / "sample-1.log")
    try:
        job.wait_for("[sample] 1 / ", timeout=400)
        job.interrupt()
        code, err = job.finish(timeout=300)
    finally:
        job.kill()
    # The exit code first: its message carries the job's whole output (a job that ended by
    # itself before the signal, or died of it, says so there).
    assert code == EXIT_INTERRUPTED, (code, job.output()[-4000:])
    line = assert_one_line(err, "sample")
    assert line == (
        "fmpipe sample: interrupted; re-run the same command to write the missing shards "
        "(the complete ones are kept)"
    )
    kept = _check_shards(_s3_shards(own_s3, bucket))
    assert 1 <= kept < SAMPLES // SHARD

    again = Job(argv, _s3_env(own_s3, home), tmp_path / "sample-2.log")
    try:
        again.wait_for(f"{kept} of {SAMPLES // SHARD} shards already at", timeout=400)
        again.wait_for("[sample] 1 / ", timeout=400)
        os.kill(own_s3.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        code, err = again.finish(timeout=300)
    finally:
        again.kill()
    line = assert_one_line(err, "sample")
    assert code == EXIT_FAILED, again.output()[-4000:]
    assert f"s3://{bucket}/out" in line and "re-run the same command" in line, line
    assert "(details: " in line and env["AWS_SECRET_ACCESS_KEY"] not in err

    port = int(env["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1])
    restarted = SeaweedFS(tmp_path / "weed", s3_port=port)
    restarted.start()
    try:
        kept_now = _check_shards(_s3_shards(restarted, bucket))
        assert kept < kept_now < SAMPLES // SHARD
        _finish_and_check(argv, _s3_env(restarted, home), tmp_path / "sample-3.log", kept_now)
    finally:
        restarted.stop()


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (tmpfs, mounted as root) at ``where``."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a small tmpfs")
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """512 KiB: three sample shards fill it up."""
    with _tmpfs(tmp_path / "disk", "512k") as disk:
        yield disk


@pytest.fixture
def run_disk(tmp_path: Path) -> Iterator[Path]:
    """1200 KiB: one checkpoint of the tiny U-Net (~0.95 MB) fits, the second does not."""
    with _tmpfs(tmp_path / "run-disk", "1200k") as disk:
        yield disk


def test_disk_full_during_train_is_one_line_and_a_rerun_resumes_from_the_newest_complete(
    run_disk: Path, digits8: Path, tmp_path: Path
) -> None:
    """The second checkpoint fills the disk: one line naming the run's folder, exit 1.
    Depending on which write meets the full disk, Ray Train's own checkpoint list (rewritten
    in place) is left empty too (seen 2 of 3 times by hand), which would stop every later
    start of the run: the test leaves it so. Once there is room, the same command sets that
    list aside and resumes from the newest complete checkpoint to the end."""
    from pipeline.storage import resolve
    from pipeline.train.resume import find_resume_point

    runs, home = run_disk / "runs", tmp_path / "home"
    argv = [*_train_argv(digits8, runs), "train.max_failures=0"]
    argv[argv.index("--images") + 1] = "640"
    argv[argv.index("--run-name") + 1] = "full"

    def run(log: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", *argv], cwd=REPO, env=job_env(home), capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        (tmp_path / log).write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
        return done

    done = run("train-disk.log")
    assert done.returncode == EXIT_FAILED, done.stdout[-3000:] + done.stderr[-3000:]
    line = assert_one_line(done.stderr, "train")
    assert "No space left on device" in line and str(runs / "full") in line, line
    point = find_resume_point(resolve(str(runs / "full")))
    assert point is not None, line  # the disk held one whole checkpoint before it filled
    ray_list = runs / "full" / "checkpoint_manager_snapshot.json"
    assert ray_list.is_file(), line  # Ray wrote it when it registered that checkpoint
    ray_list.write_bytes(b"")  # what the full disk leaves when it meets this write

    subprocess.run(["mount", "-o", "remount,size=64m", str(run_disk)], check=True)
    total = point.images_seen + 64
    argv[argv.index("--images") + 1] = str(total)
    again = run("train-disk-2.log")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout
    assert f"resuming at {point.images_seen:,} images" in out, out[-3000:]
    assert f"trained to {total:,} images" in out, out[-3000:]
    assert "checkpoint_manager_snapshot.json was empty" in again.stderr, again.stderr[-3000:]
    (kept,) = (runs / "full").glob("checkpoint_manager_snapshot.json.broken-*")
    assert kept.read_bytes() == b"" and kept.name in again.stderr


def test_disk_full_during_sample_is_one_line_and_a_rerun_completes(
    small_disk: Path, checkpoint: Path, tmp_path: Path
) -> None:
    out, home = small_disk / "out", tmp_path / "home"
    argv = _sample_argv(checkpoint, str(out), steps=2)
    job = Job(argv, job_env(home), tmp_path / "sample-disk.log")
    try:
        code, err = job.finish(timeout=400)
    finally:
        job.kill()
    line = assert_one_line(err, "sample")
    assert code == EXIT_FAILED, job.output()[-4000:]
    assert "No space left on device" in line and str(out) in line, line
    kept = _check_shards(_local_shards(out))
    assert 1 <= kept < SAMPLES // SHARD
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    _finish_and_check(argv, job_env(home), tmp_path / "sample-disk-2.log", kept)
