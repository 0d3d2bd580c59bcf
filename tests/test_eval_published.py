"""Published reference statistics (``eval.reference_stats``): reading the ``.npz`` that
pytorch-fid, clean-fid and ADM write, refusing everything else by name (pickles above
all), and scoring against statistics without feature rows. No Ray, no network."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from pipeline.eval.extract import FeatureSet
from pipeline.eval.frechet import FeatureStats
from pipeline.eval.reference import PublishedStatsError, read_published_stats
from pipeline.eval.scores import score


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _features(seed: int, n: int = 300, d: int = 8) -> FeatureSet:
    rows = np.random.default_rng(seed).normal(size=(n, d)) + 0.3 * seed
    stats = FeatureStats(n, rows.mean(0), np.cov(rows, rowvar=False))
    return FeatureSet("net", stats, rows.astype(np.float32), np.full(n, -1, np.int64))


def test_mu_sigma_and_an_optional_count_are_read_as_written() -> None:
    mu, sigma = np.arange(4.0), np.diag([1.0, 2.0, 3.0, 4.0])
    stats = read_published_stats(_npz(mu=mu, sigma=sigma), "ref.npz")
    assert stats.n == 0 and np.array_equal(stats.mean, mu) and np.array_equal(stats.cov, sigma)
    counted = read_published_stats(_npz(mu=mu, sigma=sigma, n=np.array(50_000)), "ref.npz")
    assert counted.n == 50_000
    compressed = io.BytesIO()  # pytorch-fid's --save-stats and clean-fid write compressed
    np.savez_compressed(compressed, mu=mu, sigma=sigma)
    assert np.array_equal(read_published_stats(compressed.getvalue(), "c.npz").cov, sigma)
    # ADM's reference batches carry more arrays (mu_s, sigma_s, the images): mu/sigma are used
    extra = _npz(mu=mu, sigma=sigma, mu_s=mu[:2], arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    assert np.array_equal(read_published_stats(extra, "adm.npz").mean, mu)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pickle.dumps({"mu": [0.0], "sigma": [[1.0]]}), r"x is a pickle, which fmpipe never loads"),
        (_npz(mu=np.array([object()], dtype=object), sigma=np.eye(1)), r"pickled objects"),
        (_npz(mean=np.zeros(3), cov=np.eye(3)), r"has arrays \['cov', 'mean'\]; .* mu \(d,\)"),
        (_npz(mu=np.zeros(3), sigma=np.eye(2)), r"mu has shape \(3,\) and sigma \(2, 2\)"),
        (_npz(mu=np.zeros((3, 1)), sigma=np.eye(3)), r"must be \(d,\) and \(d, d\)"),
        (_npz(mu=np.array([np.nan, 0.0]), sigma=np.eye(2)), r"not finite"),
        (b"not a zip at all", r"x is not an \.npz of statistics"),
    ],
    ids=["pickle", "object-array", "other-names", "shapes", "mu-2d", "nan", "garbage"],
)
def test_anything_but_mu_sigma_is_refused_naming_the_file(data: bytes, message: str) -> None:
    with pytest.raises(PublishedStatsError, match=message):
        read_published_stats(data, "x")


def test_a_single_npy_array_is_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    with pytest.raises(PublishedStatsError, match=r"single \.npy array"):
        read_published_stats(buffer.getvalue(), "x")


def test_statistics_without_rows_give_the_fd_and_no_other_figure() -> None:
    candidate, reference = _features(1), _features(2)
    full = score(candidate, reference, kid_subsets=5, kid_subset_size=50)
    stats_only = FeatureSet(
        "net", FeatureStats(0, reference.stats.mean, reference.stats.cov),
        np.zeros((0, 8), np.float32), np.zeros(0, np.int64), meta={"published": "x"},
    )  # fmt: skip
    scores = score(candidate, stats_only, kid_subsets=5, kid_subset_size=50)
    assert scores.fd == pytest.approx(full.fd, rel=1e-12) and full.fd > 0.1
    assert all(np.isnan(v) for v in (scores.kid, scores.kid_std, scores.precision, scores.recall))
    assert set(scores.metrics("eval/")) == {"eval/fd", "eval/n"}  # no NaN, no unknown count
    assert set(full.metrics("eval/")) >= {"eval/kid", "eval/recall", "eval/n_reference"}
    table = scores.table("t")
    assert "vs published statistics" in table and "not computed" in table, table
    assert "nan" not in table, table


def test_statistics_of_another_dimension_are_refused() -> None:
    with pytest.raises(ValueError, match=r"8-d, the reference's 4-d"):
        score(_features(1), _features(2, d=4))
