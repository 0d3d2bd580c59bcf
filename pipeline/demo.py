"""The main job on embedded defaults: prepare digits -> train -> sample, all local.

Everything lives under ``$FMPIPE_HOME`` (default ``./.fmpipe``): ``store/`` is the object
store (a local directory), ``runs/`` holds Ray Train's checkpoints, ``mlflow.db`` and
``mlartifacts/`` the tracking data. The trained model is registered as ``digits`` and the
alias ``champion`` points at it, so ``fmpipe sample --model models:/digits@champion`` works
afterwards. Re-running is cheap: prepare skips existing shards, training resumes (or finds
the run complete) and sampling writes only missing shards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.data.prepare import prepare_dataset
from pipeline.home import DEFAULT_DATASET, prepare_out, sample_out
from pipeline.sample.job import SampleResult, generate
from pipeline.tracking import tracking_uri
from pipeline.train.trainer import TrainResult, train

CHAMPION = "champion"


@dataclass
class DemoResult:
    dataset_uri: str
    train: TrainResult
    sample: SampleResult
    wall_seconds: float


def with_home_paths(cfg: Config) -> Config:
    """Fill the empty URIs of the demo config with their places under ``$FMPIPE_HOME``."""
    cfg = cfg.model_copy(deep=True)
    cfg.prepare.out = prepare_out(cfg, DEFAULT_DATASET)
    cfg.data.uri = cfg.data.uri or cfg.prepare.out
    cfg.sample.out = sample_out(cfg, DEFAULT_DATASET)
    if not cfg.train.registered_model_name:
        cfg.train.registered_model_name = "digits"
    if not cfg.train.alias:
        cfg.train.alias = CHAMPION  # the trainer points it at the version it registers
    return cfg


def run_demo(cfg: Config, say: Callable[[str], None] = print) -> DemoResult:
    began = time.perf_counter()
    cfg = with_home_paths(cfg)
    say(f"[1/3] prepare {cfg.prepare.source} -> {cfg.prepare.out}")
    prepared = prepare_dataset(cfg, log=lambda _line: None)
    say(f"      {prepared.num_samples:,} images in {prepared.wall_seconds:.1f} s")
    say(f"[2/3] train {cfg.model.kind} on {cfg.data.uri} for {cfg.train.total_images:,} images")
    trained = train(cfg, print_fn=say)
    name = cfg.train.registered_model_name
    if trained.registered_version and trained.registered_alias:
        pointer = f"models:/{name}@{trained.registered_alias}"
        say(f"      {pointer} -> version {trained.registered_version}")
    say(f"[3/3] sample {cfg.sample.num_samples:,} from {cfg.sample.model} -> {cfg.sample.out}")
    sampled = generate(
        cfg, log_line=lambda line: say(line) if line.startswith("[sample]") else None
    )
    return DemoResult(cfg.data.uri, trained, sampled, time.perf_counter() - began)


def demo_summary(result: DemoResult, cfg: Config) -> list[str]:
    uri = tracking_uri(cfg)
    lines = [
        "",
        f"demo done in {result.wall_seconds:.0f} s",
        f"  dataset      {result.dataset_uri}",
        *("  " + line for line in result.train.summary().splitlines()),
        *("  " + line for line in result.sample.summary_lines()),
    ]
    if uri.startswith("sqlite:"):
        lines.append(f"  browse runs  mlflow ui --backend-store-uri {uri}")
    return lines
