"""``fmpipe eval``: score a sample set or a model against a dataset split's reference.

1. The feature network (``eval.network``): Inception (FID) or fmpipe's classifier of the
   dataset (in-domain Fréchet distance + conditional accuracy), checked before any Ray work.
2. The reference: statistics of ``eval.reference_split`` of ``data.uri`` (computed once,
   stored under the project's storage: :mod:`pipeline.eval.reference`).
3. The candidate: a finished sample output (``--samples``), or a model (``--model``) that
   first generates ``eval.num_samples`` samples at ``eval.seed`` with ``eval.solver`` /
   ``eval.steps`` through the ordinary sample job (into ``<storage>/eval-samples/...``, so a
   re-run reuses them), then the same Ray feature job.
4. The figures (:class:`Scores`): a console table, an MLflow run in ``tracking.eval_experiment``
   tagged with the model it scored, and the registered version's tags
   (``eval.<network>.fd`` ...) when the model came from the registry.

``--sweep`` repeats 3-4 for every solver x steps of ``eval.sweep_solvers`` x
``eval.sweep_steps`` and plots the metric against NFE (PNG on disk and in MLflow). Several
models in one sweep (``--model A --model B ...``: a base, its reflow, a distilled student)
are scored on the same seeds against one reference (the first model's data) and drawn as
one plot, a curve per model and solver, in one MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.eval.classifier_job import CLASSIFIER_FILE
from pipeline.eval.extract import (
    FeatureSet,
    NetworkSpec,
    extract,
    network_identity,
    sample_shards,
)
from pipeline.eval.features import FeatureNetworkError
from pipeline.eval.reference import Reference, reference_features
from pipeline.eval.scores import Scores, score
from pipeline.home import fmpipe_home, storage_path
from pipeline.storage import resolve

__all__ = [
    "EvalResult",
    "SweepPoint",
    "classifier_bytes",
    "evaluate",
    "evaluate_samples",
    "network_spec",
    "score_models",
    "score_models_at",
    "with_reference_data",
]

EVAL_SAMPLES_DIR = "eval-samples"


def classifier_uri(cfg: Config) -> str:
    """``eval.classifier``, else the dataset's registered classifier's champion."""
    if cfg.eval.classifier.strip():
        return cfg.eval.classifier.strip()
    from pipeline.eval.classifier_job import ALIAS, classifier_model_name

    return f"models:/{classifier_model_name(cfg)}@{ALIAS}"


def classifier_bytes(cfg: Config, uri: str) -> bytes:
    """The classifier file that ``uri`` names: ``models:/`` / ``runs:/`` (the version's
    artifact directory holds ``classifier.pt``), a directory holding it, or the file."""
    from pipeline.registry import ModelNotFound, resolve_model_uri

    try:
        where = resolve_model_uri(uri, cfg).checkpoint_uri
    except ModelNotFound as exc:
        if cfg.eval.classifier.strip():
            raise
        raise ModelNotFound(
            f"{exc}. The classifier network is the dataset's own: train it with `fmpipe "
            f"classifier --data {cfg.data.uri or '<dataset>'}`, or set eval.classifier to a "
            "classifier file, or score with --network inception (eval.network; the one "
            "choice for an unlabelled dataset)"
        ) from None
    location = resolve(where, cfg.storage)
    if location.child(CLASSIFIER_FILE).exists():
        location = location.child(CLASSIFIER_FILE)
    if not location.exists():
        raise FeatureNetworkError(
            f"classifier '{uri}' not found at {location.uri}: train one with `fmpipe classifier`"
            " or set eval.classifier to a classifier file"
        )
    return location.read_bytes()


def network_spec(cfg: Config) -> NetworkSpec:
    """The configured feature network (classifier weights read here, once)."""
    if cfg.eval.network == "inception":
        return NetworkSpec(
            "inception",
            uri=cfg.eval.inception_uri.strip(),
            sha256=cfg.eval.inception_sha256.strip(),
            cache_dir=str(fmpipe_home() / "cache" / "features"),
        )
    return NetworkSpec("classifier", classifier=classifier_bytes(cfg, classifier_uri(cfg)))


# What names the images a model learnt and how they were decoded: the reference statistics
# of a model's own dataset must read the same split (a foreign dataset's val carve-out and
# labels) at the same size, or the figures compare against other images.
_REFERENCE_DATA_KEYS = (
    "uri", "index_uri", "val_uri", "val_fraction", "label_source", "label_field", "resize",
    "alpha_background", "max_pixels", "channels", "resolution",
)  # fmt: skip


def with_reference_data(cfg: Config, model: str) -> Config:
    """``cfg`` with ``data.uri`` filled: as given, else the data ``model`` learnt (its
    checkpoint's config: the dataset keys of :data:`_REFERENCE_DATA_KEYS` that ``cfg`` does
    not set), else the embedded default dataset."""
    if cfg.data.uri.strip():
        return cfg
    from pipeline.home import data_uri
    from pipeline.sample.source import training_data_section

    learnt = training_data_section(cfg, model)
    cfg = cfg.model_copy(deep=True)
    if not str(learnt.get("uri") or "").strip():
        cfg.data.uri = data_uri(cfg)
        return cfg
    given = cfg.data.model_fields_set - {"uri"}  # set, but empty: filled all the same
    for key in _REFERENCE_DATA_KEYS:
        if key in learnt and key not in given:
            setattr(cfg.data, key, learnt[key])
    return cfg


def _reference_data_of_samples(cfg: Config, samples: str, model: str) -> Config:
    """``cfg`` with ``data.uri`` the data that ``model`` (the sample set's own, from its
    manifest) learnt: samples are scored against their model's dataset unless ``--data``
    says otherwise, as a model is."""
    try:
        return with_reference_data(cfg, model)
    except Exception as exc:  # registry, storage: the reason is the problem's own text
        raise ValueError(
            f"the samples at '{samples}' were made by '{model}', whose training data cannot "
            f"be read to score them against ({type(exc).__name__}: {exc}); give the "
            "reference dataset with --data URI"
        ) from None


@dataclass
class SweepPoint:
    solver: str
    steps: int
    nfe: float
    scores: Scores
    model: str = ""  # its name in a sweep of several models (the plot's legend)


@dataclass
class EvalResult:
    """What one ``fmpipe eval`` did."""

    network: str
    reference: Reference
    scores: Scores | None = None  # one evaluation
    sweep: list[SweepPoint] = field(default_factory=list)  # --sweep
    samples_uri: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    plot_path: Path | None = None
    wall_seconds: float = 0.0

    def summary_lines(self) -> list[str]:
        lines: list[str] = []
        if self.scores is not None:
            lines.append(self.scores.table(f"eval of {self.samples_uri}"))
        if self.sweep:
            lines.append(sweep_table(self.sweep))
        ref = self.reference
        if "published" in ref.features.meta:
            lines.append(f"reference: published statistics at {ref.location.uri}")
        else:
            lines.append(
                f"reference: {ref.features.n:,} images, "
                f"{'computed now' if ref.computed else 'reused'}, at {ref.location.uri}"
            )
        if self.plot_path is not None:
            lines.append(f"plot: {self.plot_path}")
        if self.run_id:
            lines.append(f"MLflow run {self.run_id}")
        lines.append(f"wall time {self.wall_seconds:.1f} s")
        return lines


def sweep_table(points: list[SweepPoint]) -> str:
    """One row per point; a model column when the points come from several models."""
    several = len({p.model for p in points}) > 1
    width = max([len(p.model) for p in points] + [5]) if several else 0
    head = "solver   steps    NFE          FD     KIDx1e3  precision  recall  accuracy"
    rows = [(f"{'model':<{width}}  " if several else "") + head]
    for p in points:
        s = p.scores
        acc = f"{s.accuracy:8.4f}" if s.accuracy is not None else "       -"
        rows.append(
            (f"{p.model:<{width}}  " if several else "")
            + f"{p.solver:<8} {p.steps:>5} {p.nfe:>6g} {s.fd:>11.4f} {1e3 * s.kid:>11.4f} "
            f"{s.precision:>10.4f} {s.recall:>7.4f} {acc}"
        )
    return "\n".join(rows)


def _candidate(
    cfg: Config, samples_uri: str, network: NetworkSpec, say: Callable[[str], None]
) -> FeatureSet:
    return extract(sample_shards(samples_uri, cfg.storage), network, cfg.eval, seed=cfg.seed,
                   say=say)  # fmt: skip


def _score(cfg: Config, candidate: FeatureSet, reference: Reference) -> Scores:
    e = cfg.eval
    return score(candidate, reference.features, kid_subsets=e.kid_subsets,
                 kid_subset_size=e.kid_subset_size, k=e.pr_k, seed=cfg.seed)  # fmt: skip


def evaluate_samples(
    cfg: Config,
    samples_uri: str,
    *,
    network: NetworkSpec | None = None,
    reference: Reference | None = None,
    say: Callable[[str], None] = print,
) -> tuple[Scores, Reference]:
    """Scores of the sample set at ``samples_uri`` against the configured reference."""
    network = network or network_spec(cfg)
    key, _ = network_identity(network)
    reference = reference or reference_features(cfg, network, key, say=say)
    return _score(cfg, _candidate(cfg, samples_uri, network, say), reference), reference


def eval_samples_uri(cfg: Config, model: str, solver: str, steps: int) -> str:
    """Where a model's evaluation samples go: one directory per (model, solver, steps,
    seed, count), so a re-run finds them written and an edit never mixes two sets."""
    identity = json.dumps([model, solver, steps, cfg.eval.seed, cfg.eval.num_samples])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return resolve(storage_path(cfg), cfg.storage).child(EVAL_SAMPLES_DIR, digest).uri


def generate_for_eval(
    cfg: Config,
    model: str,
    solver: str,
    steps: int,
    say: Callable[[str], None],
    out: str | None = None,
) -> Any:
    """``eval.num_samples`` samples of ``model`` at ``eval.seed`` (the sample job itself),
    into ``out`` (default :func:`eval_samples_uri`)."""
    from pipeline.sample import generate

    run = cfg.model_copy(deep=True)
    run.sample.model = model
    run.sample.out = out or eval_samples_uri(cfg, model, solver, steps)
    run.sample.num_samples = cfg.eval.num_samples
    run.sample.seed = cfg.eval.seed
    run.sample.solver, run.sample.steps = solver, steps
    run.sample.num_actors = cfg.eval.num_actors
    run.sample.use_gpu = cfg.eval.use_gpu
    return generate(run, track=False, log_line=say)


def _metric_prefix(name: str) -> str:
    """``sweep/`` for one model; ``sweep/<name>/`` (MLflow's allowed characters) for several."""
    return f"sweep/{re.sub(r'[^A-Za-z0-9_. -]', '_', name)}/" if name else "sweep/"


def _log(
    cfg: Config, result: EvalResult, model_name: str, model_version: str, title: str
) -> str | None:
    """The MLflow run of this evaluation, and the registered version's tags."""
    from pipeline.tracking import Tracker

    tags = {"fmpipe.job": "eval", "fmpipe.eval_network": result.network}
    if model_name:
        tags |= {"fmpipe.model_name": model_name, "fmpipe.model_version": model_version}
    several = len({p.model for p in result.sweep}) > 1
    if several:
        tags["fmpipe.eval.models"] = json.dumps(list(dict.fromkeys(p.model for p in result.sweep)))
    experiment = cfg.tracking.eval_experiment
    with Tracker.start(cfg, experiment=experiment, run_name=title, tags=tags) as tr:
        tr.log_params({"eval.network": result.network, "eval.samples": result.samples_uri,
                       "eval.reference": result.reference.location.uri})  # fmt: skip
        if result.scores is not None:
            tr.log_metrics(result.scores.metrics("eval/"), step=0)
            tr.log_text(json.dumps(result.scores.to_dict(), indent=2), "eval/scores.json")
        steps: dict[str, int] = {}
        for point in result.sweep:
            step = steps[point.model] = steps.get(point.model, -1) + 1
            prefix = _metric_prefix(point.model if several else "")
            tr.log_metrics({**point.scores.metrics(prefix), f"{prefix}nfe": point.nfe}, step=step)
        if result.sweep:
            tr.log_text(sweep_table(result.sweep), "eval/sweep.txt")
        if result.plot_path is not None:
            tr.log_artifact(result.plot_path, "eval")
        run_id = tr.run_id
        if model_name and model_version and result.scores is not None and tr.client is not None:
            prefix = f"eval.{cfg.eval.network}."
            for name, value in result.scores.metrics().items():
                tr.client.set_model_version_tag(
                    model_name, model_version, prefix + name, f"{value:.6g}"
                )
            tr.client.set_model_version_tag(model_name, model_version, prefix + "run_id", run_id)
            # what the figures are against: a split's statistics or a published file
            tr.client.set_model_version_tag(
                model_name, model_version, prefix + "reference", result.reference.location.uri
            )
    return run_id


def evaluate(
    cfg: Config,
    *,
    samples: str = "",
    model: str | Sequence[str] = "",
    names: Sequence[str] = (),
    sweep: bool = False,
    track: bool = True,
    say: Callable[[str], None] = print,
) -> EvalResult:
    """Evaluate ``samples`` (a sample output URI) or ``model`` (see module doc), on the
    connected Ray or one local Ray started for the whole call.

    ``model`` may be several models with ``sweep``: each is swept on the same seeds against
    the first one's reference, ``names`` (default: the models as given) label their curves.
    """
    models = [model] if isinstance(model, str) else list(model)
    models = [m for m in models if m]
    if bool(samples) == bool(models):
        raise ValueError("give exactly one of --samples URI or --model MODEL")
    if sweep and not models:
        raise ValueError("--sweep evaluates a model over solvers and steps: give --model")
    if len(models) > 1 and not sweep:
        raise ValueError("several --model are compared over solvers and steps: add --sweep")
    names = list(names) or models
    if len(names) != len(models) or len(set(names)) != len(names):
        raise ValueError(f"names {names} must name each of the models {models} once")
    if samples:  # a missing or unfinished sample set fails before Ray and the network
        from pipeline.eval.extract import sample_shards

        made_by = sample_shards(samples, cfg.storage).made_by
        if not cfg.data.uri.strip():  # the data of the samples' model, else the default's
            if made_by:
                cfg = _reference_data_of_samples(cfg, samples, made_by)
            else:
                from pipeline.home import data_uri

                cfg = cfg.model_copy(deep=True)
                cfg.data.uri = data_uri(cfg)
    from pipeline.rayenv import ensure_ray

    started = ensure_ray()
    try:
        return _evaluate(cfg, samples, models, names, sweep, track, say)
    finally:
        if started:
            import ray

            ray.shutdown()


def _evaluate(
    cfg: Config, samples: str, models: list[str], names: list[str], sweep: bool, track: bool,
    say: Callable[[str], None],
) -> EvalResult:  # fmt: skip
    began = time.perf_counter()
    model_name, model_version = "", ""
    if len(models) == 1 and models[0].startswith("models:/"):
        from pipeline.registry import resolve_model_uri

        resolved = resolve_model_uri(models[0], cfg)
        model_name, model_version = resolved.name or "", resolved.version or ""
    if models:
        cfg = with_reference_data(cfg, models[0])
    network = network_spec(cfg)
    key, _ = network_identity(network)
    reference = reference_features(cfg, network, key, say=say)
    result = EvalResult(network=key, reference=reference, samples_uri=samples)

    def scored(uri: str) -> Scores:
        return evaluate_samples(cfg, uri, network=network, reference=reference, say=say)[0]

    if samples:
        result.scores = scored(samples)
    elif not sweep:
        made = generate_for_eval(cfg, models[0], cfg.eval.solver, cfg.eval.steps, say)
        result.samples_uri, result.model = made.out_uri, made.model
        result.scores = scored(made.out_uri)
    else:
        several = len(models) > 1
        for model, name in zip(models, names, strict=True):
            for solver in cfg.eval.sweep_solvers:
                for steps in cfg.eval.sweep_steps:
                    made = generate_for_eval(cfg, model, solver, steps, say)
                    point = SweepPoint(solver, steps, made.nfe_per_sample, scored(made.out_uri),
                                       model=name if several else "")  # fmt: skip
                    result.sweep.append(point)
                    result.model = made.model
                    say(f"[eval] {name + ': ' if several else ''}{solver} x {steps} steps "
                        f"({point.nfe:g} NFE): FD {point.scores.fd:.4f}")  # fmt: skip
        result.plot_path = _plot_sweep(result.sweep, key, " vs ".join(names))
    if track:
        title = "eval-compare" if len(models) > 1 else f"eval-{model_name or 'samples'}"
        result.run_id = _log(cfg, result, model_name, model_version, title)
    result.wall_seconds = time.perf_counter() - began
    return result


METRIC_NETWORKS = {"fd_classifier": "classifier", "fid": "inception"}


def score_models(
    cfg: Config,
    metric: str,
    models: list[str],
    *,
    out_root: str,
    say: Callable[[str], None] = print,
) -> list[Scores]:
    """Scores of each model under ``metric``'s network (``fd_classifier``, ``fid``): the same
    ``eval.seed`` noise, solver and steps for all, one reference; samples under
    ``out_root/<i>`` (retraining: a temporary directory)."""
    rule = (cfg.eval.solver, cfg.eval.steps)
    points = score_models_at(cfg, metric, [(m, *rule) for m in models], out_root=out_root,
                             say=say)  # fmt: skip
    return [p.scores for p in points]


def score_models_at(
    cfg: Config,
    metric: str,
    models: list[tuple[str, str, int]],
    *,
    out_root: str,
    say: Callable[[str], None] = print,
) -> list[SweepPoint]:
    """Each ``(model, solver, steps)`` scored under ``metric``'s network on the same
    ``eval.seed`` noise against one reference, with the NFE per sample its solver spent;
    samples under ``out_root/<i>``."""
    from pipeline.rayenv import ensure_ray

    cfg = cfg.model_copy(deep=True)
    cfg.eval.network = METRIC_NETWORKS[metric]  # type: ignore[assignment]
    started = ensure_ray()
    try:
        network = network_spec(cfg)
        key, _ = network_identity(network)
        reference = reference_features(cfg, network, key, say=say)
        points = []
        for i, (model, solver, steps) in enumerate(models):
            out = f"{out_root.rstrip('/')}/{i}"
            made = generate_for_eval(cfg, model, solver, steps, say, out=out)
            scores = evaluate_samples(cfg, made.out_uri, network=network, reference=reference,
                                      say=say)[0]  # fmt: skip
            points.append(SweepPoint(solver, steps, made.nfe_per_sample, scores, model=model))
        return points
    finally:
        if started:
            import ray

            ray.shutdown()


def _plot_sweep(points: list[SweepPoint], network: str, model: str) -> Path:
    """Fréchet distance against NFE, one line per solver (per model and solver when the
    points come from several models): ``<home>/eval/<hash>/sweep.png``."""
    from pipeline.viz import curves_png

    curves: dict[str, tuple[list[float], list[float]]] = {}
    for p in points:
        xs, ys = curves.setdefault(f"{p.model} {p.solver}".strip(), ([], []))
        xs.append(p.nfe)
        ys.append(p.scores.fd)
    digest = hashlib.sha256(f"{model}|{network}".encode()).hexdigest()[:12]
    path = fmpipe_home() / "eval" / digest / "sweep.png"
    return curves_png(curves, path, f"{model}: quality against NFE", xlabel="NFE per sample",
                      ylabel=f"Fréchet distance ({network})", logx=True)  # fmt: skip
