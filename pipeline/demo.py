"""The main job on embedded defaults: prepare digits -> train -> sample -> evaluate, all local.

Everything lives under ``$FMPIPE_HOME`` (default ``./.fmpipe``): ``store/`` is the object
store (a local directory), ``runs/`` holds Ray Train's checkpoints, ``mlflow.db`` and
``mlartifacts/`` the tracking data. The trained model is registered as ``digits`` and the
alias ``champion`` points at it, so ``fmpipe sample --model models:/digits@champion`` works
afterwards. Re-running is cheap: prepare skips existing shards, training resumes (or finds
the run complete) and sampling writes only missing shards. The evaluation scores the
samples with the dataset's classifier (trained and registered as ``digits-classifier`` on
the first run, reused after) beside real held-out digits against the same reference:
in-domain Fréchet distance, conditional accuracy and confidence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import Config
from pipeline.data.prepare import prepare_dataset
from pipeline.eval.scores import Scores
from pipeline.home import DEFAULT_DATASET, prepare_out, sample_out
from pipeline.sample.job import SampleResult, generate
from pipeline.storage import resolve
from pipeline.tracking import tracking_uri
from pipeline.train.trainer import TrainResult, train

CHAMPION = "champion"


@dataclass
class DemoResult:
    dataset_uri: str
    train: TrainResult
    sample: SampleResult
    wall_seconds: float
    samples_scores: Scores | None = None  # the samples against the reference
    real_scores: Scores | None = None  # real held-out digits against the same reference


def with_home_paths(cfg: Config) -> Config:
    """Fill the empty URIs of the demo config with their places under ``$FMPIPE_HOME``."""
    cfg = cfg.model_copy(deep=True)
    cfg.prepare.out = prepare_out(cfg, DEFAULT_DATASET)
    cfg.data.uri = cfg.data.uri or cfg.prepare.out
    cfg.sample.out = sample_out(cfg, DEFAULT_DATASET)
    # The run and the model sample.model (models:/digits@champion) names, wherever the
    # dataset is written.
    cfg.train.registered_model_name = cfg.train.registered_model_name or "digits"
    cfg.train.run_name = cfg.train.run_name or "digits"
    if not cfg.train.alias:
        cfg.train.alias = CHAMPION  # the trainer points it at the version it registers
    return cfg


def run_demo(cfg: Config, say: Callable[[str], None] = print) -> DemoResult:
    began = time.perf_counter()
    cfg = with_home_paths(cfg)
    say(f"[1/4] prepare {cfg.prepare.source} -> {cfg.prepare.out}")
    prepared = prepare_dataset(cfg, log=lambda _line: None)
    say(f"      {prepared.num_samples:,} images in {prepared.wall_seconds:.1f} s")
    say(f"[2/4] train {cfg.model.kind} on {cfg.data.uri} for {cfg.train.total_images:,} images")
    trained = train(cfg, print_fn=say)
    name = cfg.train.registered_model_name
    if trained.registered_version and trained.registered_alias:
        pointer = f"models:/{name}@{trained.registered_alias}"
        say(f"      {pointer} -> version {trained.registered_version}")
    say(f"[3/4] sample {cfg.sample.num_samples:,} from {cfg.sample.model} -> {cfg.sample.out}")
    sampled = generate(
        cfg, log_line=lambda line: say(line) if line.startswith("[sample]") else None
    )
    result = DemoResult(cfg.data.uri, trained, sampled, 0.0)
    say(f"[4/4] evaluate {sampled.out_uri} with the {cfg.eval.network} of {cfg.data.uri}")
    result.samples_scores, result.real_scores = evaluate_demo(cfg, sampled.out_uri, say)
    result.wall_seconds = time.perf_counter() - began
    return result


def evaluate_demo(
    cfg: Config, samples_uri: str, say: Callable[[str], None]
) -> tuple[Scores, Scores]:
    """The samples and real held-out digits (``val``) against one reference: the
    classifier trained first when none is registered for this dataset."""
    from pipeline.eval.classifier_job import HELD_OUT, fit_classifier
    from pipeline.eval.job import evaluate
    from pipeline.registry import ModelNotFound

    quiet = lambda line: say(line) if line.startswith("[classifier]") else None  # noqa: E731
    if cfg.eval.network == "classifier":
        from pipeline.eval.job import classifier_bytes, classifier_uri

        try:
            classifier_bytes(cfg, classifier_uri(cfg))
        except ModelNotFound:
            fitted = fit_classifier(cfg, say=quiet)
            say(f"      classifier {fitted.registered}: {fitted.accuracy:.1%} held-out accuracy")
    from pipeline.rayenv import ensure_ray

    started = ensure_ray()  # one local Ray for both evaluations
    try:
        samples = evaluate(cfg, samples=samples_uri, say=lambda _line: None).scores
        held_out = resolve(cfg.data.uri).child(HELD_OUT).uri
        real = evaluate(cfg, samples=held_out, say=lambda _line: None).scores
    finally:
        if started:
            import ray

            ray.shutdown()
    assert samples is not None and real is not None
    return samples, real


def quality_lines(result: DemoResult) -> list[str]:
    """The samples' figures beside real held-out digits' (the floor at this sample size)."""
    s, r = result.samples_scores, result.real_scores
    if s is None or r is None:
        return []

    def row(label: str, x: Scores) -> str:
        accuracy = "-" if x.accuracy is None else f"{x.accuracy:.3f}"
        confidence = "-" if x.confidence is None else f"{x.confidence:.3f}"
        return f"    {label:<24}{x.fd:12.3f}  {accuracy:>14}  {confidence:>10}"

    return [
        f"  quality      ({s.network}, against {s.n_reference:,} training digits)",
        "                            Fréchet distance  cond. accuracy  confidence",
        row(f"samples ({s.n:,})", s),
        row(f"real held-out ({r.n:,})", r),
    ]


def demo_summary(result: DemoResult, cfg: Config) -> list[str]:
    uri = tracking_uri(cfg)
    lines = [
        "",
        f"demo done in {result.wall_seconds:.0f} s",
        f"  dataset      {result.dataset_uri}",
        *("  " + line for line in result.train.summary().splitlines()),
        *("  " + line for line in result.sample.summary_lines()),
        *quality_lines(result),
    ]
    if uri.startswith("sqlite:"):
        lines.append(f"  browse runs  mlflow ui --backend-store-uri {uri}")
    return lines
