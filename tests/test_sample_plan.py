"""The plan and finalize steps of ``fmpipe sample`` on their own (no Ray), and the solver step
rule as the sample job applies it (job identity, sample metadata, MLflow params, CLI help)."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from pipeline.config import Config, build_config
from pipeline.data.manifest import MANIFEST_NAME, Manifest, shard_name
from pipeline.flow import GaussianVelocity
from pipeline.flow.solvers import ADAPTIVE_SOLVERS, SOLVERS
from pipeline.sample.finalize import finalize, start_tracker
from pipeline.sample.plan import (
    JOB_FILE,
    SampleJobError,
    SamplePlan,
    job_identity,
    plan_job,
    validate_settings,
)
from pipeline.sample.pool import PoolRun
from pipeline.sample.sampler import SamplerActor
from pipeline.sample.source import ModelSource


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FMPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def sample_cfg(out: str, **sample) -> Config:
    return build_config({"sample": {"out": out, **sample}})


def gaussian_source(shape=(1, 4, 4)) -> ModelSource:
    factory = functools.partial(GaussianVelocity, 0.3, 0.2)
    return ModelSource.from_factory(factory, shape, uri="test:gaussian")


def write_in_process(plan: SamplePlan, shards: list[int]) -> list[dict]:
    """Shards written by a SamplerActor in this process, as the pool's actors write them."""
    actor = SamplerActor(plan.source.factory, plan.settings)
    return [actor.write_shard(j, *plan.ranges[j]) for j in shards]


# --------------------------------------------------------------------------- plan


def test_plan_of_a_new_output_needs_no_ray(tmp_path: Path) -> None:
    out = tmp_path / "out"
    lines: list[str] = []
    cfg = sample_cfg(str(out), num_samples=40, shard_size=16, steps=2)
    plan = plan_job(cfg, gaussian_source(), 8, lines.append)
    assert not ray.is_initialized()
    assert lines == [f"model: test:gaussian (test:gaussian), output: {out}"]
    assert plan.ranges == [(0, 16), (16, 32), (32, 40)]
    assert plan.todo == [(0, 0, 16), (1, 16, 32), (2, 32, 40)] and plan.done == {}
    assert plan.block_size == 8 and plan.settings.block_size == 8
    written = json.loads((out / JOB_FILE).read_text())
    assert written["identity"] == plan.identity
    assert written["model"]["model_uri"] == "test:gaussian"


def test_plan_finds_done_shards_and_redoes_broken_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = sample_cfg(str(out), num_samples=48, shard_size=16, steps=2)
    first = plan_job(cfg, gaussian_source(), 8, lambda _: None)
    write_in_process(first, [0, 2])
    (out / shard_name(1)).write_bytes(b"not a tar")  # broken: written again

    lines: list[str] = []
    again = plan_job(cfg, gaussian_source(), 8, lines.append)
    assert sorted(again.done) == [0, 2]
    assert again.todo == [(1, 16, 32)]
    assert lines[-1] == f"2 of 3 shards already at {out}; writing 1"

    other = sample_cfg(str(out), num_samples=48, shard_size=16, steps=3)
    with pytest.raises(SampleJobError, match=r"another job \(steps: 2 there, 3 now\)"):
        plan_job(other, gaussian_source(), 8, lambda _: None)


def test_plan_refuses_settings_the_model_cannot_honour(tmp_path: Path) -> None:
    source = gaussian_source()
    with pytest.raises(SampleJobError, match=r"sample\.label=1 given, but model test:gaussian"):
        validate_settings(sample_cfg("", label=1), source)
    with pytest.raises(SampleJobError, match=r"sample\.guidance_scale=2\.0 needs a class-cond"):
        validate_settings(sample_cfg("", guidance_scale=2.0), source)
    flat = ModelSource.from_factory(functools.partial(GaussianVelocity, 0.3, 0.2), (16,))
    with pytest.raises(SampleJobError, match=r"shape \(16,\); fmpipe sample writes images"):
        plan_job(sample_cfg(str(tmp_path / "o")), flat, 8, lambda _: None)
    with pytest.raises(SampleJobError, match="block_size must be >= 1"):
        plan_job(sample_cfg(str(tmp_path / "o")), source, -1, lambda _: None)
    assert not (tmp_path / "o" / JOB_FILE).exists()  # nothing written for a refused job


# --------------------------------------------------------------------------- finalize


def test_finalize_after_an_in_process_run(tmp_path: Path) -> None:
    """The steps compose without Ray: plan, shards written in process, finalize."""
    out = tmp_path / "out"
    cfg = sample_cfg(str(out), num_samples=40, shard_size=16, steps=4, seed=3)
    plan = plan_job(cfg, gaussian_source(), 8, lambda _: None)
    rows = write_in_process(plan, [j for j, _, _ in plan.todo])
    result = finalize(cfg, plan, PoolRun(rows, seconds=2.0), None, time.perf_counter())
    manifest = Manifest.from_json((out / MANIFEST_NAME).read_text())
    assert manifest == result.manifest and manifest.num_samples == 40
    assert [s.num_samples for s in manifest.shards] == [16, 16, 8]
    assert manifest.extra["steps"] == 4 and manifest.extra["seed"] == 3
    assert (result.samples_written, result.shards_written, result.samples_per_sec) == (40, 3, 20)
    assert result.nfe_per_sample == 4 and result.mlflow_run_id is None
    assert result.grid_path is not None and result.grid_path.is_file()


def test_finalize_refuses_a_short_or_missing_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = sample_cfg(str(out), num_samples=32, shard_size=16, steps=2)
    plan = plan_job(cfg, gaussian_source(), 8, lambda _: None)
    rows = write_in_process(plan, [0])
    with pytest.raises(RuntimeError, match=r"shards \[1\] were not written; re-run"):
        finalize(cfg, plan, PoolRun(rows, 1.0), None, time.perf_counter())
    short = [{**rows[0], "num_samples": 15}]
    with pytest.raises(RuntimeError, match="shard 0 came back with 15 samples, not 16"):
        finalize(cfg, plan, PoolRun(short, 1.0), None, time.perf_counter())
    assert not (out / MANIFEST_NAME).exists()


# --------------------------------------------------------------------------- the step rule


def test_identity_and_metadata_record_only_what_the_solver_uses() -> None:
    source = gaussian_source()
    adaptive = [sample_cfg("", solver="dopri5", steps=k, atol=1e-4) for k in (4, 8)]
    ids = [job_identity(c, source, 8) for c in adaptive]
    assert ids[0] == ids[1]
    assert (ids[0]["steps"], ids[0]["atol"], ids[0]["rtol"]) == (None, 1e-4, 1e-5)

    fixed = [sample_cfg("", solver="heun", steps=4, atol=a) for a in (1e-4, 1e-3)]
    ids = [job_identity(c, source, 8) for c in fixed]
    assert ids[0] == ids[1] and (ids[0]["steps"], ids[0]["atol"]) == (4, None)
    assert job_identity(sample_cfg("", solver="heun", steps=5), source, 8)["steps"] == 5


def test_mlflow_params_say_adaptive_for_an_adaptive_solver(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pipeline.tracking import tracking_uri

    cfg = sample_cfg(str(tmp_path / "out"), solver="dopri5", steps=9)
    plan = plan_job(cfg, gaussian_source(), 8, lambda _: None)
    assert plan.settings.fixed_steps is None
    meta = plan.settings.sample_meta(0, None)
    assert meta["steps"] is None and (meta["atol"], meta["rtol"]) == (1e-5, 1e-5)
    tracker = start_tracker(cfg, plan)
    tracker.end()
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    params = client.get_run(tracker.run_id).data.params
    assert params["solver"] == "dopri5" and params["steps"] == "adaptive"

    euler = copy.deepcopy(cfg)
    euler.sample.solver = "euler"
    euler.sample.out = str(tmp_path / "out-euler")
    plan = plan_job(euler, gaussian_source(), 8, lambda _: None)
    assert "atol" not in plan.settings.sample_meta(0, None)
    tracker = start_tracker(euler, plan)
    tracker.end()
    assert client.get_run(tracker.run_id).data.params["steps"] == "9"


def test_cli_solver_names_are_the_solvers() -> None:
    """--help lists the solvers the code implements (read from the torch-free solver table)."""
    from jobs.sample import ADAPTIVE_SOLVER_NAMES, SOLVER_NAMES, build_parser

    assert SOLVER_NAMES == SOLVERS and ADAPTIVE_SOLVER_NAMES == ADAPTIVE_SOLVERS
    code = "import sys, jobs.sample; print('torch' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.stdout.strip() == "False", loaded.stderr  # --help stays free of torch
    text = " ".join(build_parser().format_help().split())
    assert " | ".join(SOLVERS) in text
    assert f"adaptive ones ({', '.join(ADAPTIVE_SOLVERS)}) ignore it" in text
