"""docs/operations.md's walk-through runs as written.

The block after the ``<!-- walkthrough ... -->`` comment in docs/operations.md is extracted
and run in one bash, command by command, against a real local stack (SeaweedFS, MLflow
server, Ray head on 127.0.0.1) in a temporary ``$FMPIPE_HOME``: ``fmpipe stack up``, then
prepare, train (``--alias champion``) and sample ``models:/digits@champion`` submitted as
Ray jobs, then ``fmpipe stack down``. The one substitution is the doc's own: the sizes are
the variables at the block's top (``IMAGES=${IMAGES:-20000}`` ...), set small here. Every
command must exit 0, in order, and the sample command's ``--out`` must then hold its shards
and a manifest that lists them. The stack is taken down in a finalizer whatever fails.

``fmpipe`` is this checkout's ``python -m jobs.cli`` (a shell function: the console script
on PATH may belong to another checkout); PATH starts with this Python's bin directory for
``ray`` and ``weed``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.serial  # its own stack (Ray head, servers): alone, not beside another file

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "operations.md"
MARK = "<!-- walkthrough"
SMALL = {"IMAGES": "256", "SAMPLES": "32", "STEPS": "4"}  # the doc's size variables
STEP = "@@walkthrough"  # marker lines the script prints after each command

# The caller's own cluster, S3 or MLflow settings must not leak into the walk-through.
_CLEARED = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "FMPIPE_HOME",
)

# Run after the sample command, while the stack is up: what its --out holds, as one line.
_CHECK_SHARDS = """
import json, sys
from pipeline.storage import resolve
out = resolve(sys.argv[1])
manifest = json.loads(out.child("_manifest.json").read_bytes())
print("@@shards", json.dumps({"files": out.list_names(".tar"), "manifest": manifest}))
"""


# --------------------------------------------------------------------------- extraction
def walkthrough_blocks(markdown: str) -> list[str]:
    """The code of each fenced block right after a ``<!-- walkthrough ... -->`` line."""
    blocks = []
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if not line.strip().startswith(MARK):
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or not lines[j].strip().startswith("```"):
            raise ValueError(f"docs line {i + 1}: {MARK} is not followed by a fenced block")
        end = next((k for k in range(j + 1, len(lines)) if lines[k].strip() == "```"), None)
        if end is None:
            raise ValueError(f"docs line {j + 1}: the walk-through block is never closed")
        blocks.append("\n".join(lines[j + 1 : end]))
    return blocks


def shell_commands(block: str) -> list[str]:
    """One entry per command: ``\\``-continued lines joined, blank and comment lines skipped."""
    commands, pending = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.strip()[:-1].rstrip() + " "
            continue
        command = (pending + line.strip()).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    if pending.strip():
        raise ValueError(f"the walk-through ends inside a continued line: {pending!r}")
    return commands


def doc_commands() -> list[str]:
    blocks = walkthrough_blocks(DOC.read_text())
    assert blocks, f"{DOC.relative_to(REPO)} has no {MARK} block"
    return [command for block in blocks for command in shell_commands(block)]


def _is_sample(command: str) -> bool:
    words = shlex.split(command, comments=True)
    return words[:1] == ["fmpipe"] and "sample" in words[1:3] and "--out" in words


def _out_of(command: str) -> str:
    words = shlex.split(command, comments=True)
    return words[words.index("--out") + 1]


def script(commands: list[str]) -> str:
    """bash that runs ``commands`` in order, says each one's exit status, stops at the first
    that fails, and lists the sample output after the (last) sample command."""
    last_sample = max((i for i, c in enumerate(commands) if _is_sample(c)), default=None)
    lines = ["set -u", 'fmpipe() { "$FMPIPE_PYTHON" -m jobs.cli "$@"; }']
    for i, command in enumerate(commands):
        lines += [
            f"echo {STEP} {i} start: {shlex.quote(command)}",
            command,
            "__rc=$?",
            f'echo "{STEP} {i} rc=$__rc at ${{SECONDS}} s"; [ "$__rc" = 0 ] || exit "$__rc"',
        ]
        if i == last_sample:
            check = shlex.quote(_CHECK_SHARDS)
            lines.append(f'"$FMPIPE_PYTHON" -c {check} {shlex.quote(_out_of(command))} || exit 9')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- fast checks
def test_the_doc_has_a_walkthrough_that_trains_an_alias_and_samples_it():
    commands = doc_commands()
    assert commands[0].startswith("IMAGES=")  # the sizes, visible, with their defaults
    assert any(c.startswith("fmpipe stack up") for c in commands)
    assert commands[-1].startswith("fmpipe stack down")
    train = next(c for c in commands if c.startswith("fmpipe submit train"))
    assert "--alias champion" in train and '"$IMAGES"' in train
    sample = [c for c in commands if _is_sample(c)]
    assert sample and "models:/digits@champion" in sample[-1]
    for name in SMALL:
        assert f"${{{name}:-" in commands[0], f"the walk-through does not size {name}"


def test_extraction_joins_continuations_and_refuses_a_broken_block():
    text = "x\n<!-- walkthrough -->\n\n```bash\na \\\n  b\n# note\n\nc  # tail\n```\n"
    assert [shell_commands(b) for b in walkthrough_blocks(text)] == [["a b", "c  # tail"]]
    with pytest.raises(ValueError, match="not followed by a fenced block"):
        walkthrough_blocks("<!-- walkthrough -->\ntext\n")
    with pytest.raises(ValueError, match="never closed"):
        walkthrough_blocks("<!-- walkthrough -->\n```bash\na\n")


def test_the_script_stops_at_the_first_failing_command(tmp_path):
    """A broken sequence fails: the runner stops there and reports the command's status."""
    out = subprocess.run(
        ["bash", "-c", script(["true", "false", "echo never"])],
        capture_output=True,
        text=True,
        env={**os.environ, "FMPIPE_PYTHON": sys.executable},
    )
    assert out.returncode == 1
    assert f"{STEP} 0 rc=0 " in out.stdout and f"{STEP} 1 rc=1 " in out.stdout
    assert "never" not in out.stdout.replace("echo never", "")


# --------------------------------------------------------------------------- the real run
def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(SMALL)
    env["FMPIPE_HOME"] = str(home)
    env["FMPIPE_PYTHON"] = sys.executable
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _stack(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.stack", *args, "--home", str(home)],
        cwd=REPO,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def walkthrough_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    try:
        yield home
    finally:  # whatever happened: nothing of the stack outlives the test
        status = _stack(home, "status", "--json", timeout=60).stdout
        _stack(home, "down", timeout=120)
        # this test's Ray session files: the stack's Ray temp dir (outside the home), as
        # `fmpipe stack up/status` print it ("logs /tmp/fmpipe-ray-<id>/session_latest/logs")
        log = tmp_path / "walkthrough.log"
        seen = status + (log.read_text(errors="replace") if log.exists() else "")
        for temp_dir in set(re.findall(r"/tmp/fmpipe-ray-[0-9a-f]+", seen)):
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_operations_walkthrough_runs_as_written(walkthrough_home: Path, tmp_path: Path) -> None:
    commands = doc_commands()
    try:
        run = subprocess.run(
            ["bash", "-c", script(commands)],
            cwd=REPO,
            env=_env(walkthrough_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=900,
        )
        log, code = run.stdout, run.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        log, code = out.decode(errors="replace") if isinstance(out, bytes) else out, None
    (tmp_path / "walkthrough.log").write_text(log)
    tail = "\n".join(log.splitlines()[-80:])
    for i, command in enumerate(commands):
        done = re.search(rf"^{STEP} {i} rc=0 ", log, re.MULTILINE)
        assert done, f"walk-through command {i} failed: {command}\n{tail}"
    assert code == 0, tail

    shards = json.loads(next(line for line in log.splitlines() if line.startswith("@@shards"))[9:])
    manifest = shards["manifest"]
    samples = int(SMALL["SAMPLES"])
    assert manifest["num_samples"] == samples
    assert sorted(shard["name"] for shard in manifest["shards"]) == sorted(shards["files"])
    assert shards["files"] and all(re.fullmatch(r"shard-\d{6}\.tar", f) for f in shards["files"])
