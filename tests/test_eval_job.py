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
    first = evaluate(cfg, samples=str(Path(cfg.data.uri) / "train"), say=lambda _: None)
    real = first.scores
    assert real is not None and first.reference.computed
    assert real.accuracy is not None and real.accuracy > 0.95, real.table("real")
    assert sum(c.n for c in real.per_class.values()) == real.n
    assert real.n == dataset_shards(cfg, "train").num_samples
    assert real.n_reference == dataset_shards(cfg, "val").num_samples

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


def test_eval_refuses_a_missing_sample_set_and_a_missing_classifier(cfg, tmp_path) -> None:
    from pipeline.eval.features import FeatureNetworkError
    from pipeline.storage import StorageInputError

    with pytest.raises(StorageInputError, match=r"holds no _manifest\.json"):
        sample_shards(str(tmp_path / "nothing"))
    other = cfg.model_copy(deep=True)
    other.eval.classifier = str(tmp_path / "missing.pt")
    with pytest.raises(FeatureNetworkError, match=r"missing\.pt"):
        classifier_bytes(other, other.eval.classifier)
