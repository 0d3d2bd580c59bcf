"""The in-domain classifier: accuracy on real digits, determinism, features, files.

The images are the demo dataset's own: scikit-learn digits through ``DigitsSource`` and
``prepare_image`` (what ``fmpipe prepare`` stores) at the default 16x16, 1 channel, split
by ``split_indices`` with the default val fraction and seed.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch

from pipeline.config import Config
from pipeline.data.prepare import split_indices
from pipeline.data.shards import prepare_image
from pipeline.data.sources import DigitsSource
from pipeline.eval.classifier import (
    FORMAT,
    ClassifierFeatures,
    ClassifierSpec,
    SmallClassifier,
    evaluate,
    load_classifier,
    save_classifier,
    train_classifier,
)
from pipeline.eval.features import FeatureNetwork, FeatureNetworkError
from pipeline.eval.frechet import FeatureStats, frechet_distance

# One thread: the test machine is shared, and oversubscribed OpenMP threads make the
# small ops of this network many times slower than one thread does.
THREADS = 1


class Digits:
    """The prepared digits: uint8 images (N, 1, R, R), labels (N,), the train/val split."""

    def __init__(self) -> None:
        cfg = Config()
        pcfg = cfg.prepare
        source = DigitsSource()
        self.images = torch.from_numpy(
            np.stack(
                [
                    np.asarray(prepare_image(source.load(i)[0], pcfg.resolution, pcfg.channels))
                    for i in range(len(source))
                ]
            )
        )[:, None]
        self.labels = torch.from_numpy(source.labels)
        split = split_indices(len(source), pcfg.val_fraction, cfg.seed)
        self.train = torch.from_numpy(split["train"])
        self.val = torch.from_numpy(split["val"])
        self.spec = ClassifierSpec(
            channels=pcfg.channels, resolution=pcfg.resolution, num_classes=10
        )


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


@pytest.fixture(scope="module")
def trained(digits: Digits) -> tuple[SmallClassifier, float]:
    """The classifier on the train split with the default schedule, and its training time."""
    start, cpu = time.perf_counter(), time.process_time()
    model = train_classifier(
        digits.images[digits.train],
        digits.labels[digits.train],
        digits.spec,
        seed=0,
        num_threads=THREADS,
    )
    print(
        f"\nclassifier trained in {time.perf_counter() - start:.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU"
    )
    return model, time.perf_counter() - start


@pytest.fixture(scope="module")
def network(trained: tuple[SmallClassifier, float]) -> ClassifierFeatures:
    return ClassifierFeatures(trained[0], trained[0].spec)


def test_held_out_accuracy(digits: Digits, trained: tuple[SmallClassifier, float]) -> None:
    model, seconds = trained
    result = evaluate(model, digits.images[digits.val], digits.labels[digits.val])
    accuracy = result["accuracy"]
    figures = (
        f"held-out accuracy {accuracy:.4f} on {len(digits.val)} digits, trained in {seconds:.1f} s"
    )
    print(figures)
    assert accuracy > 0.95, figures
    assert set(result["per_class_accuracy"]) == set(range(10))
    assert 0.5 < result["confidence"] <= 1.0


def test_same_seed_same_weights_other_seed_differs(digits: Digits) -> None:
    images, labels = digits.images[digits.train[:256]], digits.labels[digits.train[:256]]

    def state(seed: int) -> dict[str, torch.Tensor]:
        model = train_classifier(
            images, labels, digits.spec, epochs=1, batch_size=64, seed=seed, num_threads=THREADS
        )
        return model.state_dict()

    before = torch.random.get_rng_state()
    a, b, c = state(3), state(3), state(4)
    assert torch.equal(torch.random.get_rng_state(), before), "global RNG was consumed"
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    assert not all(torch.equal(a[k], c[k]) for k in a), "different seeds, same weights"


def _corrupt(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """images + N(0, sigma^2) per pixel (in grey levels), rounded and clamped to uint8."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator) * sigma
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_frechet_distance_orders_corruption(digits: Digits, network: ClassifierFeatures) -> None:
    val = digits.images[digits.val]
    half = len(val) // 2
    real_a, real_b = val[:half], val[half:]
    # The classifier shrugs off mild noise (sigma 40 moves FD less than the ~3-8 that two
    # 90-image halves of val differ by), so "light" is sigma 80 (FD ~6-7), "heavy" 160
    # (~28), against ~75 for uniform noise. All draws are seeded: the outcome is fixed.
    generator = torch.Generator().manual_seed(7)
    noise = torch.randint(0, 256, real_b.shape, generator=generator, dtype=torch.uint8)
    reference = FeatureStats.from_features(network.features(real_a))

    def fd(images: torch.Tensor) -> float:
        return frechet_distance(reference, FeatureStats.from_features(network.features(images)))

    values = [
        fd(real_b),
        fd(_corrupt(real_b, 80.0, seed=1)),
        fd(_corrupt(real_b, 160.0, seed=2)),
        fd(noise),
    ]
    shown = ", ".join(f"{v:.3f}" for v in values)
    assert values == sorted(values) and len(set(values)) == 4, f"FD real/light/heavy/noise: {shown}"


def test_conditional_accuracy(digits: Digits, network: ClassifierFeatures) -> None:
    images, labels = digits.images[digits.val], digits.labels[digits.val]
    true = network.conditional_accuracy(images, labels)
    assert true.n == len(labels)
    assert true.accuracy > 0.95, f"accuracy with true labels {true.accuracy:.4f}"
    assert sum(n for _, n in true.per_class.values()) == true.n
    for y, (acc, n) in true.per_class.items():
        assert n == int((labels == y).sum())
        assert 0.0 <= acc <= 1.0

    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    wrong = network.conditional_accuracy(images, shuffled)
    assert wrong.accuracy < 0.3, f"accuracy with shuffled labels {wrong.accuracy:.4f}"
    assert sum(n for _, n in wrong.per_class.values()) == wrong.n
    # confidence belongs to the predictions, not the labels
    assert wrong.confidence == pytest.approx(true.confidence)

    probs = network.predict(images)
    assert probs.dtype == np.float64 and probs.shape == (len(labels), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        network.conditional_accuracy(images, labels + 10)


def test_feature_network_protocol(digits: Digits, network: ClassifierFeatures) -> None:
    assert isinstance(network, FeatureNetwork)
    assert network.name == "classifier" and network.dim == digits.spec.feature_dim
    assert network.key.startswith("classifier:") and len(network.key) == len("classifier:") + 12
    images = digits.images[digits.val[:20]]
    feats = network.features(images)
    assert feats.dtype == np.float64 and feats.shape == (20, network.dim)
    # GroupNorm only: an image's features do not depend on the rest of its batch
    np.testing.assert_allclose(network.features(images[:5]), feats[:5], rtol=1e-5, atol=1e-6)
    # another size and channel count are converted, not refused
    big = torch.nn.functional.interpolate(images.float(), size=32, mode="nearest")
    rgb = big.round().to(torch.uint8).expand(-1, 3, -1, -1)
    assert network.features(rgb).shape == (20, network.dim)
    with pytest.raises(ValueError, match="uint8"):
        network.features(images.float())


def test_save_load_round_trip(
    tmp_path, digits: Digits, trained: tuple[SmallClassifier, float], network: ClassifierFeatures
) -> None:
    model = trained[0]
    path = tmp_path / "classifier.pt"
    save_classifier(model, model.spec, path)
    loaded = load_classifier(path)
    assert loaded.key == network.key and loaded.spec == network.spec
    images = digits.images[digits.val[:50]]
    np.testing.assert_array_equal(loaded.features(images), network.features(images))

    buffer = io.BytesIO()
    save_classifier(model, model.spec, buffer)
    assert load_classifier(buffer.getvalue()).key == network.key
    # the file is a plain dict that a weights-only load reads
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["spec"]["num_classes"] == 10


def test_key_follows_weights(digits: Digits, trained: tuple[SmallClassifier, float]) -> None:
    model = trained[0]
    clone = SmallClassifier(model.spec)
    clone.load_state_dict(model.state_dict())
    assert ClassifierFeatures(clone).key == ClassifierFeatures(model).key
    with torch.no_grad():
        clone.head.bias[0] += 1e-3
    assert ClassifierFeatures(clone).key != ClassifierFeatures(model).key


def test_bad_files_raise_feature_network_error(
    tmp_path, trained: tuple[SmallClassifier, float]
) -> None:
    model = trained[0]
    good = tmp_path / "good.pt"
    save_classifier(model, model.spec, good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"x": 1}, foreign)
    no_state = tmp_path / "no_state.pt"
    torch.save({"format": FORMAT, "spec": {"channels": 1}}, no_state)
    other_spec = tmp_path / "other_spec.pt"
    state = model.state_dict()
    wide = {**asdict(model.spec), "feature_dim": 64}
    torch.save({"format": FORMAT, "spec": wide, "state_dict": state}, other_spec)
    code = tmp_path / "code.pt"
    torch.save({"format": FORMAT, "spec": asdict(model.spec), "state_dict": Digits}, code)

    cases = [
        (truncated, "cannot be read"),
        (foreign, "format tag None"),
        (no_state, r"lacks keys \['state_dict'\]"),
        (other_spec, "has shape"),
        (code, "cannot be read"),  # a pickled class is refused by weights_only
        (tmp_path / "missing.pt", "does not exist"),
    ]
    for path, problem in cases:
        with pytest.raises(FeatureNetworkError, match=problem) as info:
            load_classifier(path)
        assert str(path) in str(info.value)
