"""pipeline.redact: the one scrubber (what counts as a secret, where it is removed) and the rule
that nothing under pipeline/ imports the job entry points."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from pipeline import redact
from pipeline.redact import (
    RedactingFilter,
    install_log_redaction,
    is_secret_name,
    remember,
    scrub,
)

REPO = Path(__file__).resolve().parents[1]
# Built at run time: no secret literal sits whole in a traceback or in this file's bytes.
VALUE = "v4lue-" + "only-in-this-test-" + "31337"


@pytest.fixture(autouse=True)
def _no_ray_token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.ray/auth_token of the machine leaks into these tests' expectations."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)


@pytest.mark.parametrize(
    "name",
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "RAY_AUTH_TOKEN",
        "FMPIPE_TEST_SECRET",
        "SOME_API_TOKEN",
        "DB_PASSWORD",
        "GITHUB_TOKEN",
        "HF_TOKEN",
        "OPENAI_API_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    ],
)
def test_secret_variables_are_scrubbed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_secret_name(name)
    monkeypatch.setenv(name, VALUE)
    out = scrub(f"failed with {VALUE} at the end")
    assert VALUE not in out and out == "failed with *** at the end"


@pytest.mark.parametrize(
    "name",
    [
        "RAY_AUTH_TOKEN_PATH",
        "AWS_SHARED_CREDENTIALS_FILE",
        "RAY_AUTH_MODE",
        "TOKENIZERS_PARALLELISM",
        "MLFLOW_TRACKING_URI",
        "AWS_REGION",
        "HOME",
        "PATH",
    ],
)
def test_paths_modes_and_ordinary_variables_are_not_secrets(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not is_secret_name(name)
    monkeypatch.setenv(name, VALUE)
    assert scrub(f"x {VALUE} y") == f"x {VALUE} y"


def test_union_of_the_old_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    # key=value pairs (the storage rule) and URL passwords (the tracking rule), one marker
    assert scrub("secret_key='abc123def'") == "secret_key='***'"
    assert scrub("password=hunter22; next") == "password=***; next"
    assert scrub("aws_session_token: FQoGZXIvYXdzE") == "aws_session_token: ***"
    assert scrub("http://user:pw1234@host/x") == "http://user:***@host/x"
    assert scrub("s3://AKID:" + "S3CRET@bucket/x") == "s3://AKID:***@bucket/x"
    # short values and boolean-like values of pattern-matched names are left alone
    monkeypatch.setenv("FMPIPE_TEST_SECRET", "abc")
    monkeypatch.setenv("SOME_TOKEN", "true")
    assert scrub("abc is true") == "abc is true"
    # idempotent
    once = scrub("token: abcdef123 and password=hunter22")
    assert scrub(once) == once and "abcdef123" not in once


def test_ray_token_files_are_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "auth_token"
    token_file.write_text(VALUE + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert scrub(f"Bearer {VALUE}") == "Bearer ***"
    token_file.write_text("an0ther-" + "token-value-42")  # rotated: read again
    assert scrub("Bearer an0ther-token-value-42") == "Bearer ***"
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    default = Path.home() / ".ray" / "auth_token"  # Ray's default place (HOME is tmp here)
    default.parent.mkdir(parents=True)
    default.write_text("d3fault-" + "token-value-7")
    assert scrub("sent d3fault-token-value-7") == "sent ***"


def test_remembered_values_are_scrubbed() -> None:
    secret = "rem3mbered-" + "from-a-profile"
    remember(secret, None, "ab")  # None and short values are ignored
    assert scrub(f"key {secret}") == "key ***"
    assert "ab" in redact.scrub("ab")


def test_log_lines_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", VALUE)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger("test_redact.isolated")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        install_log_redaction(logger)
        install_log_redaction(logger)  # once only
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logging.getLogger("test_redact.isolated").warning("connecting with %s", VALUE)
        try:
            raise RuntimeError(f"refused {VALUE}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert VALUE not in text
    assert "connecting with ***" in text and "RuntimeError: refused ***" in text


# --------------------------------------------------------------------------- layering


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return names


def test_nothing_in_pipeline_imports_jobs() -> None:
    """The library sits below the entry points: jobs/ imports pipeline/, never the reverse
    (function-level imports included)."""
    offenders = []
    files = sorted((REPO / "pipeline").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        for name in _imported_modules(path):
            if name == "jobs" or name.startswith("jobs."):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert offenders == []


def test_the_layering_check_sees_function_level_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "def f():\n    from jobs.cli import JOBS\n    import jobs.train\n"
        "    importlib.import_module('jobs.x')\n"
    )
    assert _imported_modules(sample) == {"jobs.cli", "jobs.train", "jobs.x"}


def test_job_table_serves_cli_and_submit() -> None:
    from jobs import cli
    from pipeline.jobtable import JOBS, submittable

    assert list(cli.JOBS) == list(JOBS)
    assert "submit" not in submittable() and "stack" not in submittable()
    assert {"prepare", "train", "sample", "retrain"} <= set(submittable())
    for job in JOBS.values():
        assert (REPO / (job.module.replace(".", "/") + ".py")).is_file(), job


def test_console_streams_are_scrubbed_even_across_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from pipeline.redact import ScrubbingStream

    monkeypatch.setenv("FMPIPE_TEST_SECRET", VALUE)
    raw = io.StringIO()
    stream = ScrubbingStream(raw)  # type: ignore[arg-type]
    half = len(VALUE) // 2
    stream.write(f"start {VALUE[:half]}")
    stream.write(f"{VALUE[half:]} end\nprogress {VALUE}")
    assert raw.getvalue() == "start *** end\n"  # the unfinished line waits
    stream.flush()
    assert raw.getvalue() == "start *** end\nprogress ***"
    assert stream.isatty() is False and stream.wrapped is raw  # the rest is the stream's


def test_a_job_entry_point_scrubs_its_prints(tmp_path: Path) -> None:
    """run_job (every job's main) routes print() and logging through the scrubber."""
    import os
    import subprocess
    import sys

    code = (
        "from jobs._common import run_job\n"
        "def body():\n"
        "    import logging, os\n"
        "    print('printed', os.environ['FMPIPE_TEST_SECRET'])\n"
        "    logging.getLogger('x').warning('logged %s', os.environ['FMPIPE_TEST_SECRET'])\n"
        "    return 0\n"
        "raise SystemExit(run_job(body))\n"
    )
    env = {**os.environ, "FMPIPE_TEST_SECRET": VALUE, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "printed ***" in proc.stdout and "logged ***" in proc.stderr
    assert VALUE not in proc.stdout + proc.stderr


def test_redacted_console_puts_the_streams_back(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from pipeline.redact import ScrubbingStream, redacted_console

    monkeypatch.setenv("FMPIPE_TEST_SECRET", VALUE)
    before = sys.stdout
    with redacted_console():
        assert isinstance(sys.stdout, ScrubbingStream) and isinstance(sys.stderr, ScrubbingStream)
        print(f"line {VALUE}")
        print(f"no newline {VALUE}", end="")
    assert sys.stdout is before
    assert capsys.readouterr().out == "line ***\nno newline ***"  # held-back text flushed
