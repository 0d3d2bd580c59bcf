"""fmpipe eval and fmpipe classifier on a real digits dataset, a real local Ray and MLflow.

One module Ray (tests/localray.py) and one classifier trained by the job itself serve every
test: the Ray feature job against the plain loop, scores of real and generated sample sets,
the reference computed once and then reused, and the registered classifier.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from localray import local_ray
from tiny import TINY_UNET

from pipeline.config import Config, build_config
from pipeline.data.prepare import prepare_dataset
from pipeline.eval.classifier import load_classifier
from pipeline.eval.classifier_job import classifier_model_name, fit_classifier
from pipeline.eval.extract import (
    FeatureSet,
    NetworkSpec,
    dataset_shards,
    extract_local,
    extract_ray,
    sample_shards,
)
from pipeline.eval.job import classifier_bytes, evaluate
from pipeline.models import build_model
from pipeline.sample import ModelSource, generate


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("eval")
    tree = {
        "prepare": {"source": "digits", "out": str(root / "digits")},
        "data": {"uri": str(root / "digits")},
        "model": {**TINY_UNET, "attention_resolutions": [8], "num_classes": 10},
        "train": {"storage_path": str(root / "runs")},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        "eval": {"kid_subsets": 20, "num_actors": 2},
    }
    config = build_config(tree)
    prepare_dataset(config, log=None)
    return config


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(cfg: Config):
    with local_ray(num_cpus=4, by_value=sys.modules[__name__]):
        yield


@pytest.fixture(scope="module")
def classifier(cfg: Config) -> tuple[object, bytes]:
    """The job's own result and the registered classifier's bytes."""
    result = fit_classifier(cfg, say=lambda _: None)
    return result, classifier_bytes(cfg, f"models:/{classifier_model_name(cfg)}@champion")


def test_classifier_job_registers_an_accurate_classifier(cfg, classifier) -> None:
    result, data = classifier
    assert result.accuracy > 0.95, f"held-out accuracy {result.accuracy:.4f}"
    assert result.registered == "models:/digits-classifier/1"
    assert result.n_val == dataset_shards(cfg, "val").num_samples
    # The registered version holds exactly the stored file.
    stored = Path(result.uri).read_bytes()
    assert data == stored
    network = load_classifier(io.BytesIO(data))
    val = dataset_shards(cfg, "val")
    assert network.key.startswith("classifier:")
    assert val.num_classes == 10


def _assert_same_stats(a: FeatureSet, b: FeatureSet, what: str) -> None:
    # Tolerance: features are float32 from different batch compositions (conv kernels may
    # differ by a few ulps); moments are accumulated in float64 in another order.
    assert a.n == b.n, what
    np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-5, atol=1e-6, err_msg=what)
    np.testing.assert_allclose(a.stats.cov, b.stats.cov, rtol=1e-4, atol=1e-6, err_msg=what)
    np.testing.assert_allclose(a.kept, b.kept, rtol=1e-5, atol=1e-5, err_msg=what)
    assert sorted(a.labels.tolist()) == sorted(b.labels.tolist()), what
    assert a.predicted is not None and b.predicted is not None
    assert (
        np.bincount(a.predicted, minlength=10).tolist()
        == np.bincount(b.predicted, minlength=10).tolist()
    ), what


def test_ray_job_statistics_equal_one_process(cfg, classifier) -> None:
    _, data = classifier
    spec = NetworkSpec("classifier", classifier=data)
    shards = dataset_shards(cfg, "train")
    alone = extract_local(shards, spec.build(), batch_size=64, keep=200)
    assert alone.n == shards.num_samples and len(alone.kept) == 200
    for batch_size in (16, 50):
        on_ray = extract_ray(shards, spec, num_actors=2, batch_size=batch_size, keep=200,
                             say=lambda _: None)  # fmt: skip
        _assert_same_stats(alone, on_ray, f"2 actors, batch {batch_size}")
    # The file round trip keeps every array.
    again = FeatureSet.from_bytes(alone.to_bytes(), "test")
    np.testing.assert_array_equal(again.stats.cov, alone.stats.cov)
    assert again.network_key == alone.network_key


def _noise_samples(cfg: Config, out: Path) -> str:
    """Samples of an untrained conditional U-Net: images far from digits."""
    run = cfg.model_copy(deep=True)
    run.sample.out, run.sample.num_samples, run.sample.steps = str(out), 200, 2
    torch.manual_seed(0)
    network = build_model(cfg.model, (1, 16, 16))
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.2 * torch.randn_like(p))  # the output conv starts at zero
    source = ModelSource.from_factory(lambda: network, (1, 16, 16))
    return generate(run, source=source, track=False, log_line=None).out_uri


def test_eval_scores_real_digits_above_generated_noise(cfg, classifier, tmp_path) -> None:
    # Through the Ray job (small sets would be read in this process) ...
    cfg = cfg.model_copy(deep=True)
    cfg.eval.local_max_images = 0
    # ... real held-out digits (val) against the reference (train, the default split).
    first = evaluate(cfg, samples=str(Path(cfg.data.uri) / "val"), say=lambda _: None)
    real = first.scores
    assert real is not None and first.reference.computed
    assert real.accuracy is not None and real.accuracy > 0.95, real.table("real")
    assert sum(c.n for c in real.per_class.values()) == real.n
    assert real.n == dataset_shards(cfg, "val").num_samples
    assert real.n_reference == dataset_shards(cfg, "train").num_samples

    noise_uri = _noise_samples(cfg, tmp_path / "noise")
    second = evaluate(cfg, samples=noise_uri, say=lambda _: None)
    noise = second.scores
    assert noise is not None and not second.reference.computed  # stored once, reused
    assert second.reference.location.uri == first.reference.location.uri
    assert noise.fd > 5 * real.fd, (real.fd, noise.fd)
    assert noise.kid > real.kid and noise.precision < real.precision
    assert noise.accuracy is not None and noise.accuracy < 0.5
    assert sample_shards(noise_uri).num_samples == noise.n == 200

    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(second.run_id)
    assert run.data.metrics["eval/fd"] == pytest.approx(noise.fd)
    assert run.data.metrics["eval/n"] == 200
    assert run.data.tags["fmpipe.job"] == "eval"


def test_published_statistics_give_the_same_fd_and_no_other_figure(cfg, classifier, tmp_path):
    """eval.reference_stats: an .npz of mu/sigma (pytorch-fid's / clean-fid's / ADM's format)
    made from the split's own statistics scores the same sample set to the same FD, with KID
    and precision/recall not computed (nor logged); fmpipe's own reference file, given the
    same way, gives every figure; statistics of another dimension are refused by name."""
    from pipeline.eval.reference import PublishedStatsError

    val = str(Path(cfg.data.uri) / "val")
    own = evaluate(cfg, samples=val, say=lambda _: None)
    assert own.scores is not None
    stats = own.reference.features.stats
    published = tmp_path / "digits-train.npz"
    np.savez(published, mu=stats.mean, sigma=stats.cov)  # pytorch-fid --save-stats' arrays

    run = cfg.model_copy(deep=True)
    run.eval.reference_stats = str(published)
    lines: list[str] = []
    result = evaluate(run, samples=val, say=lines.append)
    scores = result.scores
    assert scores is not None
    assert scores.fd == pytest.approx(own.scores.fd, rel=1e-9, abs=1e-12)
    assert np.isnan(scores.kid) and np.isnan(scores.precision) and np.isnan(scores.recall)
    assert scores.n == own.scores.n and scores.n_reference == 0  # the file states no count
    assert scores.accuracy == pytest.approx(own.scores.accuracy)  # the samples' own figure
    assert any("published statistics" in line and "FD only" in line for line in lines), lines
    table = "\n".join(result.summary_lines())
    assert "vs published statistics" in table and "not computed" in table, table
    assert f"reference: published statistics at {published}" in table, table
    logged = mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data
    assert logged.metrics["eval/fd"] == pytest.approx(scores.fd)
    assert not {"eval/kid", "eval/precision", "eval/recall", "eval/n_reference"} & set(
        logged.metrics
    ), logged.metrics
    assert logged.params["eval.reference"] == str(published)

    run.eval.reference_stats = own.reference.location.uri  # fmpipe's own file: every figure
    again = evaluate(run, samples=val, say=lambda _: None).scores
    assert again is not None and again.kid == pytest.approx(own.scores.kid)
    assert again.fd == pytest.approx(own.scores.fd) and again.recall == own.scores.recall

    wrong = tmp_path / "inception.npz"
    np.savez(wrong, mu=np.zeros(2048), sigma=np.eye(2048))
    run.eval.reference_stats = str(wrong)
    with pytest.raises(PublishedStatsError, match=r"2048-d statistics; the .* gives \d+-d"):
        evaluate(run, samples=val, say=lambda _: None)


def test_eval_refuses_a_missing_sample_set_and_a_missing_classifier(cfg, tmp_path) -> None:
    from pipeline.eval.features import FeatureNetworkError
    from pipeline.storage import StorageInputError

    with pytest.raises(StorageInputError, match=r"holds no _manifest\.json"):
        sample_shards(str(tmp_path / "nothing"))
    other = cfg.model_copy(deep=True)
    other.eval.classifier = str(tmp_path / "missing.pt")
    with pytest.raises(FeatureNetworkError, match=r"missing\.pt"):
        classifier_bytes(other, other.eval.classifier)
    # No classifier registered for this dataset: the error says how to get one, and what
    # scores a dataset that has no labels to train one on.
    from pipeline.eval.job import classifier_uri
    from pipeline.registry import ModelNotFound

    untrained = cfg.model_copy(deep=True)
    untrained.data.uri = str(tmp_path / "photos")
    with pytest.raises(ModelNotFound) as info:
        classifier_bytes(untrained, classifier_uri(untrained))
    message = str(info.value)
    assert f"fmpipe classifier --data {tmp_path / 'photos'}`" in message, message
    assert "--network inception" in message and "unlabelled" in message, message


def test_bench_eval_prints_the_ratio_of_the_ray_job_to_the_plain_loop(cfg, classifier) -> None:
    from pipeline.bench.eval import run_eval_benchmark

    lines: list[str] = []
    cfg = cfg.model_copy(deep=True)
    cfg.eval.classifier = classifier[0].uri
    figures = run_eval_benchmark(cfg, actors=2, batch_size=64, log=lines.append)
    text = "\n".join(lines)
    assert "(a) plain loop" in text and "(b) Ray Data job, 2 actor(s)" in text, text
    assert "b / (a x 2) = " in text, text
    assert figures["plain_images_per_s"] > 0 and figures["ray_images_per_s"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["ray_images_per_s"] / (2 * figures["plain_images_per_s"])
    )


def _checkpoint(cfg: Config, directory: Path, scale: float) -> Path:
    """A real checkpoint of an untrained conditional U-Net with weights jittered by ``scale``
    (its config names the digits dataset, as a trained one's would)."""
    from pipeline.checkpoint import TrainState, save_checkpoint

    torch.manual_seed(0)
    network = build_model(cfg.model, (1, 16, 16))
    with torch.no_grad():
        for p in network.parameters():
            p.add_(scale * torch.randn_like(p))
    state = TrainState(images_seen=64, step=1, data_shape=[1, 16, 16], mlflow_run_id="")
    return save_checkpoint(directory, model=network, ema=network, state=state, config=cfg)


def test_a_sample_set_is_scored_against_the_data_its_model_learnt(cfg, classifier, tmp_path):
    """`fmpipe eval --samples` without --data: the reference is the dataset its model learnt
    (the model the sample set's manifest names), read with that run's dataset settings;
    keys the caller sets win. A model that can no longer be read is one clear error naming
    --data, before any Ray work."""
    import shutil

    from pipeline.eval.job import with_reference_data

    model = _checkpoint(cfg, tmp_path / "m" / "checkpoint_000000000064", 0.2)
    run = cfg.model_copy(deep=True)
    run.sample.model, run.sample.out = str(model), str(tmp_path / "samples")
    run.sample.num_samples, run.sample.steps = 20, 1
    out = generate(run, track=False, log_line=None).out_uri
    assert Path(sample_shards(out).made_by.removeprefix("file://")) == Path(model)
    assert dataset_shards(cfg, "val").made_by == ""  # a dataset split names no model

    bare = build_config({"train": {"storage_path": cfg.train.storage_path},
                         "tracking": {"uri": cfg.tracking.uri}})  # fmt: skip
    assert bare.data.uri == ""
    result = evaluate(bare, samples=out, track=False, say=lambda _: None)
    assert result.scores is not None and result.scores.n == 20
    assert result.scores.n_reference == dataset_shards(cfg, "train").num_samples
    given = evaluate(cfg, samples=out, track=False, say=lambda _: None)
    assert given.reference.location.uri == result.reference.location.uri
    assert given.scores is not None and given.scores.fd == result.scores.fd

    # The dataset keys of the model's run come along; training-only keys and set keys do not.
    learnt = cfg.model_copy(deep=True)
    learnt.data.val_fraction, learnt.data.label_field, learnt.data.batch_size = 0.25, "a.b", 7
    other = _checkpoint(learnt, tmp_path / "o" / "checkpoint_000000000064", 0.2)
    mine = build_config({"data": {"label_field": "mine"}})
    got = with_reference_data(mine, str(other)).data
    assert (got.uri, got.val_fraction, got.label_field) == (cfg.data.uri, 0.25, "mine")
    assert got.batch_size == 128 and got.resolution == cfg.data.resolution

    shutil.rmtree(model.parent)
    with pytest.raises(ValueError, match=r"made by .*give the reference dataset with --data"):
        evaluate(bare, samples=out, track=False, say=lambda _: None)
    # A set that names no model (a dataset split) keeps the default dataset, as before.
    from pipeline.data.stream import DatasetError

    with pytest.raises(DatasetError, match=r"store/digits.* does not exist"):
        evaluate(bare, samples=str(Path(cfg.data.uri) / "val"), track=False, say=lambda _: None)


def test_models_are_scored_on_identical_seeds_and_one_reference(cfg, classifier, tmp_path):
    """What retraining compares: the same checkpoint twice scores exactly alike (same noise,
    solver and reference); another one does not."""
    from pipeline.eval.job import score_models

    cfg = cfg.model_copy(deep=True)
    cfg.eval.num_samples, cfg.eval.steps = 60, 2
    a = str(_checkpoint(cfg, tmp_path / "a" / "checkpoint_000000000064", 0.2))
    b = str(_checkpoint(cfg, tmp_path / "b" / "checkpoint_000000000064", 0.05))
    scores = score_models(cfg, "fd_classifier", [a, a, b], out_root=str(tmp_path / "eval"),
                          say=lambda _: None)  # fmt: skip
    assert [s.n for s in scores] == [60, 60, 60]
    assert scores[0].fd == scores[1].fd and scores[0].kid == scores[1].kid
    assert scores[2].fd != scores[0].fd
    assert scores[0].network == scores[2].network and scores[0].network.startswith("classifier:")


def test_retrain_verdict_follows_the_chosen_metric_and_tags_both_figures() -> None:
    from pipeline.retrain import _Evaluation

    # Better on val loss, worse on the Fréchet distance: rejected when the distance decides.
    ev = _Evaluation(0.10, 0.20, 180, 0.0, "fd_classifier", candidate_metric=9.0,
                     champion_metric=3.0)  # fmt: skip
    better, reason = ev.verdict("1")
    assert not better
    assert "fd_classifier 9.00000 is not below the champion's (version 1) 3.00000" in reason
    assert "(val_loss 0.10000 vs 0.20000)" in reason
    tags = ev.tags()
    assert tags["fd_classifier"] == "9" and tags["champion_fd_classifier"] == "3"
    assert tags["val_loss"] == "0.1" and tags["champion_val_loss"] == "0.2"
    assert tags["fmpipe.retrain.metric"] == "fd_classifier"
    # The same figures with val_loss deciding: promoted.
    assert _Evaluation(0.10, 0.20, 180, 0.0).verdict("1") == (True, "")
    assert ev.deciding() == ("fd_classifier", 9.0, 3.0)


def test_training_scores_its_ema_weights_and_tags_the_registered_version(
    cfg, classifier, tmp_path
) -> None:
    """train.eval_every_images: the EMA weights scored on fixed seeds during training (a
    history in MLflow) and the last figures tagged on the registered version."""
    from pipeline.train.trainer import train

    run = cfg.model_copy(deep=True)
    run.data.batch_size = 16
    run.train.run_name, run.train.storage_path = "eval-in-training", str(tmp_path / "runs")
    run.train.total_images, run.train.warmup_images = 64, 16
    run.train.cpus_per_worker, run.train.torch_threads = 1, 1
    run.train.checkpoint_every_images = run.train.val_every_images = 64
    run.train.grid_every_images = 10**6
    run.train.eval_every_images = 32
    run.train.registered_model_name = "eval-in-training"
    run.eval.num_samples, run.eval.steps = 40, 2
    lines: list[str] = []
    result = train(run, print_fn=lines.append)
    evals = [line for line in lines if "eval of 40 samples: Fréchet distance" in line]
    assert len(evals) == 2, lines  # at 32 and 64 images
    client = mlflow.MlflowClient(cfg.tracking.uri)
    history = client.get_metric_history(result.mlflow_run_id, "eval/fd")
    assert [m.step for m in history] == [32, 64]
    version = client.get_model_version("eval-in-training", "1")
    assert float(version.tags["eval.classifier.fd"]) == pytest.approx(history[-1].value, rel=1e-5)
    assert 0.0 <= float(version.tags["eval.classifier.accuracy"]) <= 1.0


def test_a_students_training_probe_samples_with_its_own_k_steps(cfg, classifier, tmp_path):
    """A distilled student is scored during training at the rule its version carries
    (Euler x train.distill_steps), not at eval.solver x eval.steps; and a run on pairs (no
    data.uri of its own) against the data of the model that made them."""
    from pipeline.eval.probe import QualityProbe

    run = cfg.model_copy(deep=True)
    run.eval.solver, run.eval.steps = "heun", 32
    probe = QualityProbe.from_config(run)
    assert (probe.solver, probe.steps) == ("heun", 32)
    run.train.objective, run.train.distill_steps = "distill", 4
    student = QualityProbe.from_config(run)
    assert (student.solver, student.steps) == ("euler", 4)

    base = _checkpoint(run, tmp_path / "base" / "checkpoint_000000000064", 0.2)
    on_pairs = run.model_copy(deep=True)
    on_pairs.data.uri = ""  # as fmpipe reflow trains: data.pairs only
    from_base = QualityProbe.from_config(on_pairs, data_of=str(base))
    assert from_base.reference_uri == probe.reference_uri
    assert from_base.network == probe.network  # the base's dataset's classifier


def test_sweep_tables_and_plots_quality_against_nfe(cfg, classifier, tmp_path) -> None:
    from pipeline.eval.job import sweep_table

    run = cfg.model_copy(deep=True)
    run.eval.num_samples, run.eval.sweep_solvers, run.eval.sweep_steps = (
        40,
        ["euler", "heun"],
        [1, 2],
    )
    model = str(_checkpoint(run, tmp_path / "m" / "checkpoint_000000000064", 0.2))
    result = evaluate(run, model=model, sweep=True, say=lambda _: None)
    assert [(p.solver, p.steps) for p in result.sweep] == [
        ("euler", 1), ("euler", 2), ("heun", 1), ("heun", 2)
    ]  # fmt: skip
    nfe = {(p.solver, p.steps): p.nfe for p in result.sweep}
    assert nfe[("euler", 1)] < nfe[("euler", 2)] and nfe[("heun", 1)] < nfe[("heun", 2)]
    assert all(p.scores.n == 40 for p in result.sweep)
    assert result.plot_path is not None and result.plot_path.read_bytes()[:4] == b"\x89PNG"
    table = sweep_table(result.sweep)
    assert table.count("\n") == 4 and "heun" in table
    client = mlflow.MlflowClient(cfg.tracking.uri)
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "eval")]
    assert "eval/sweep.png" in artifacts and "eval/sweep.txt" in artifacts, artifacts
    assert len(client.get_metric_history(result.run_id, "sweep/fd")) == 4


def test_a_sweep_of_several_models_is_one_table_one_plot_and_one_run(cfg, classifier, tmp_path):
    """fmpipe eval --sweep --model A --model B: the same seeds and reference for both, a curve
    per model in one plot, each model's metrics under its own name in one MLflow run."""
    from pipeline.eval.job import sweep_table

    run = cfg.model_copy(deep=True)
    run.eval.num_samples, run.eval.sweep_solvers, run.eval.sweep_steps = 40, ["euler"], [1, 2]
    a = str(_checkpoint(run, tmp_path / "a" / "checkpoint_000000000064", 0.2))
    b = str(_checkpoint(run, tmp_path / "b" / "checkpoint_000000000064", 0.05))
    result = evaluate(run, model=[a, b], names=["base", "2-RF"], sweep=True, say=lambda _: None)
    assert [(p.model, p.steps) for p in result.sweep] == [
        ("base", 1), ("base", 2), ("2-RF", 1), ("2-RF", 2)
    ]  # fmt: skip
    fd = {(p.model, p.steps): p.scores.fd for p in result.sweep}
    assert fd["base", 1] != fd["2-RF", 1]  # two models, not one scored twice
    alone = evaluate(run, model=a, sweep=True, track=False, say=lambda _: None)
    assert [p.scores.fd for p in alone.sweep] == [fd["base", 1], fd["base", 2]]  # same seeds
    assert [p.nfe for p in alone.sweep] == [1, 2]  # sets reused: their NFE as recorded
    table = sweep_table(result.sweep)
    assert table.splitlines()[0].startswith("model") and table.count("2-RF") == 2, table
    client = mlflow.MlflowClient(cfg.tracking.uri)
    history = client.get_metric_history(result.run_id, "sweep/2-RF/fd")
    assert [m.value for m in history] == pytest.approx([fd["2-RF", 1], fd["2-RF", 2]])
    assert client.get_run(result.run_id).data.tags["fmpipe.eval.models"] == '["base", "2-RF"]'
    assert "eval/sweep.png" in [a.path for a in client.list_artifacts(result.run_id, "eval")]
    with pytest.raises(ValueError, match="add --sweep"):
        evaluate(run, model=[a, b], say=lambda _: None)


def _register_checkpoints(cfg: Config, name: str, checkpoints: list[Path]) -> list[str]:
    from pipeline.tracking import Tracker

    tracker = Tracker.start(cfg, experiment="judge-test", run_name=name)
    versions = []
    for i, ckpt in enumerate(checkpoints):
        tracker.log_artifacts(ckpt, f"checkpoints/{i}")
        versions.append(tracker.register_model_version(name, f"checkpoints/{i}"))
    tracker.end()
    return versions


def test_retrain_judges_a_registered_candidate_at_the_champions_nfe_budget(
    cfg, classifier, tmp_path
) -> None:
    """fmpipe retrain --candidate: a 1-step version (a student's own rule) against a champion
    sampled at 2 steps, by fd_classifier on the same seeds; promoted exactly when its figures
    say so, a candidate that needs more NFE than the champion rejected for that alone, and a
    decided candidate not scored again."""
    from pipeline.config import ConfigError
    from pipeline.promote import judge_candidate

    run = cfg.model_copy(deep=True)
    run.eval.num_samples, run.eval.solver, run.eval.steps = 40, "euler", 2
    run.train.registered_model_name, run.retrain.metric = "judged", "fd_classifier"
    champion, student, slow = _register_checkpoints(
        run, "judged",
        [_checkpoint(run, tmp_path / "c" / "checkpoint_000000000064", 1.0),  # saturated samples
         _checkpoint(run, tmp_path / "s" / "checkpoint_000000000064", 0.2),
         _checkpoint(run, tmp_path / "h" / "checkpoint_000000000064", 0.2)],
    )  # fmt: skip
    client = mlflow.MlflowClient(cfg.tracking.uri)
    client.set_registered_model_alias("judged", "champion", champion)
    client.set_model_version_tag("judged", student, "fmpipe.sample.solver", "euler")
    client.set_model_version_tag("judged", student, "fmpipe.sample.steps", "1")
    client.set_model_version_tag("judged", slow, "fmpipe.sample.solver", "heun")
    client.set_model_version_tag("judged", slow, "fmpipe.sample.steps", "4")

    # fmpipe eval --model <student> samples at its own rule unless --solver/--steps say
    from jobs import eval as eval_job
    from jobs._common import parse_job_args

    def rule(*argv: str) -> tuple[str, int] | None:
        return eval_job.own_sampling_rule(run, parse_job_args(eval_job.build_parser(), list(argv)))

    assert rule("--model", f"models:/judged/{student}") == ("euler", 1)
    assert rule("--model", f"models:/judged/{slow}") == ("heun", 4)
    assert rule("--model", f"models:/judged/{student}", "--steps", "2") is None
    assert rule("--model", f"models:/judged/{student}", "eval.solver=heun") is None
    assert rule("--model", f"models:/judged/{champion}") is None  # no fmpipe.sample.* tags
    assert rule("--sweep", "--model", f"models:/judged/{student}") is None

    run.retrain.candidate = f"models:/judged/{student}"
    lines: list[str] = []
    result = judge_candidate(run, print_fn=lines.append)
    cand, champ = result.extra["candidate"], result.extra["champion"]
    assert (cand.nfe, champ.nfe) == (1, 2) and cand.rule == "euler x 1", lines
    tags = client.get_model_version("judged", student).tags
    assert float(tags["fd_classifier"]) == pytest.approx(cand.fd, rel=1e-5)
    assert float(tags["champion_fd_classifier"]) == pytest.approx(champ.fd, rel=1e-5)
    assert tags["fmpipe.retrain.nfe"] == "1" and tags["fmpipe.retrain.champion_nfe"] == "2"
    assert cand.fd < champ.fd, (cand, champ)  # the saturated champion is far from digits
    assert result.outcome == "promoted" and tags["fmpipe.retrain.decision"] == "promoted"
    assert str(client.get_model_version_by_alias("judged", "champion").version) == student

    run.retrain.candidate = f"models:/judged/{slow}"  # heun x 4: 8 NFE against 1
    rejected = judge_candidate(run, print_fn=lines.append)
    assert rejected.outcome == "rejected"
    assert "more than the champion's budget of 1 (euler x 1)" in rejected.message, rejected.message
    assert str(client.get_model_version_by_alias("judged", "champion").version) == student
    again = judge_candidate(run, print_fn=lines.append)
    assert again.outcome == "already_evaluated" and "rejected" in again.message
    assert "candidate" not in again.extra  # not scored again

    run.retrain.metric = "val_loss"
    with pytest.raises(ConfigError, match=r"retrain\.metric=fd_classifier"):
        judge_candidate(run, print_fn=lines.append)
    run.retrain.metric, run.retrain.candidate = "fd_classifier", "models:/other/1"
    with pytest.raises(ConfigError, match=r"not a version of train\.registered_model_name"):
        judge_candidate(run, print_fn=lines.append)


def test_retrain_scores_candidate_and_champion_by_the_chosen_metric(cfg, classifier, tmp_path):
    """Retraining's evaluation step with retrain.metric=fd_classifier: the candidate (from its
    MLflow run, as the retrain job reads it) and the champion get val loss on the same val
    draws and the Fréchet distance on the same seeds and reference; the distance decides
    whatever the val losses say, and both figures become tags."""
    from pipeline.eval.job import score_models
    from pipeline.retrain import _evaluate
    from pipeline.tracking import Tracker

    run = cfg.model_copy(deep=True)
    run.eval.num_samples, run.eval.solver, run.eval.steps = 40, "euler", 2
    run.retrain.metric = "fd_classifier"
    worse = _checkpoint(run, tmp_path / "cand" / "checkpoint_000000000064", 1.0)  # saturated
    champion = _checkpoint(run, tmp_path / "champ" / "checkpoint_000000000064", 0.2)
    tracker = Tracker.start(run, experiment="retrain-metric-test", run_name="candidate")
    tracker.log_artifacts(worse, "checkpoint")
    tracker.end()
    ev = _evaluate(run, str(tracker.run_id), "checkpoint", champion, str(tmp_path / "work"))
    alone = score_models(run, "fd_classifier", [str(worse), str(champion)],
                         out_root=str(tmp_path / "alone"), say=lambda _: None)  # fmt: skip
    assert (ev.candidate_metric, ev.champion_metric) == (alone[0].fd, alone[1].fd)
    assert ev.candidate_metric > ev.champion_metric  # the saturated samples are far from digits
    assert ev.candidate is not None and ev.champion is not None  # val losses, both measured
    assert ev.deciding() == ("fd_classifier", alone[0].fd, alone[1].fd)
    better, reason = ev.verdict("7")
    assert not better and "is not below the champion's (version 7)" in reason, reason
    tags = ev.tags()
    assert float(tags["fd_classifier"]) == pytest.approx(alone[0].fd, rel=1e-5)
    assert float(tags["champion_fd_classifier"]) == pytest.approx(alone[1].fd, rel=1e-5)
