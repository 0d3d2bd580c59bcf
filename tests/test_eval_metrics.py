"""Feature-space metrics: Fréchet distance, streaming stats, KID, precision/recall (numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval.frechet import (
    FeatureStats,
    StatsAccumulator,
    frechet_distance,
    kid,
    precision_recall,
)


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


# --- Fréchet distance ---------------------------------------------------------------


def test_fd_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = FeatureStats(n=100, mean=mu1, cov=np.diag(s1))
    b = FeatureStats(n=100, mean=mu2, cov=np.diag(s2))
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_fd_commuting_rotated_covariances():
    d = 8
    q = _rotation(d, 1)
    rng = np.random.default_rng(2)
    e1, e2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    e2[0] = 0.0  # singular covariance: rank d - 1
    a = FeatureStats(n=10, mean=np.zeros(d), cov=q @ np.diag(e1) @ q.T)
    b = FeatureStats(n=10, mean=np.ones(d), cov=q @ np.diag(e2) @ q.T)
    expected = d + ((np.sqrt(e1) - np.sqrt(e2)) ** 2).sum()
    # the zero eigenvalue comes back as rounding noise ~1e-16 whose square root (~1e-8)
    # enters the trace: about sqrt(machine epsilon), and the BLAS's order decides its sign
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


def test_fd_non_commuting_2x2():
    # For 2x2 M = S_a S_b (non-negative eigenvalues): Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    sa = np.array([[2.0, 0.9], [0.9, 1.0]])
    sb = np.array([[0.5, -0.3], [-0.3, 3.0]])
    m = sa @ sb
    assert not np.allclose(m, m.T)
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = 1.0**2 + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt
    a = FeatureStats(n=5, mean=np.array([1.0, 0.0]), cov=sa)
    b = FeatureStats(n=5, mean=np.array([0.0, 0.0]), cov=sb)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-12)


def test_fd_sample_stats_match_analytic():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, 0.5, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 0.5, 2.0, 4.0])
    x = mu1 + rng.standard_normal((n, d)) * np.sqrt(s1)
    y = mu2 + rng.standard_normal((n, d)) * np.sqrt(s2)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    got = frechet_distance(FeatureStats.from_features(x), FeatureStats.from_features(y))
    assert got == pytest.approx(expected, rel=2e-2)


def test_fd_self_zero_and_symmetric():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64))
    y = rng.standard_normal((300, 64)) + 0.3
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    assert frechet_distance(sx, sx) <= 1e-9 * np.trace(sx.cov)
    fxy, fyx = frechet_distance(sx, sy), frechet_distance(sy, sx)
    assert fxy > 1.0
    assert fxy == pytest.approx(fyx, rel=1e-10)


def test_fd_errors():
    a = FeatureStats(n=10, mean=np.zeros(3), cov=np.eye(3))
    with pytest.raises(ValueError, match="dims"):
        frechet_distance(a, FeatureStats(n=10, mean=np.zeros(4), cov=np.eye(4)))
    with pytest.raises(ValueError, match="n >= 2"):
        frechet_distance(a, FeatureStats(n=1, mean=np.zeros(3), cov=np.eye(3)))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(a, FeatureStats(n=10, mean=np.array([0.0, np.nan, 0.0]), cov=np.eye(3)))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(FeatureStats(n=10, mean=np.zeros(3), cov=np.diag([1.0, np.inf, 1.0])), a)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        FeatureStats(n=10, mean=np.zeros(3), cov=np.eye(2))


# --- streaming statistics -----------------------------------------------------------


def test_accumulator_batches_and_merge_equal_one_pass():
    rng = np.random.default_rng(5)
    # A large common offset: naive sums of x x^T would lose ~8 digits here.
    x = 1e4 + rng.standard_normal((1000, 16)) @ rng.standard_normal((16, 16))
    one = FeatureStats.from_features(x)
    np.testing.assert_allclose(one.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(one.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)

    acc = StatsAccumulator()
    for lo, hi in [(0, 1), (1, 2), (2, 2), (2, 137), (137, 500), (500, 1000)]:
        acc.add(x[lo:hi])
    batched = acc.result()
    left = StatsAccumulator().add(x[:300]).add(x[300:450])
    right = StatsAccumulator().add(x[450:])
    merged = StatsAccumulator().merge(left).merge(StatsAccumulator()).merge(right).result()
    scale = np.abs(one.cov).max()
    for s in (batched, merged):
        assert s.n == 1000
        np.testing.assert_allclose(s.mean, one.mean, rtol=1e-12)
        np.testing.assert_allclose(s.cov, one.cov, rtol=1e-10, atol=1e-10 * scale)
    assert np.array_equal(one.cov, one.cov.T)


def test_accumulator_float32_input_and_errors():
    x = np.random.default_rng(6).standard_normal((50, 3)).astype(np.float32)
    s = FeatureStats.from_features(x)
    assert s.mean.dtype == np.float64 and s.cov.dtype == np.float64
    np.testing.assert_allclose(s.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    acc = StatsAccumulator().add(x)
    with pytest.raises(ValueError, match="d=3"):
        acc.add(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="d=3"):
        acc.merge(StatsAccumulator().add(np.zeros((4, 5))))
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        acc.add(np.zeros(3))
    with pytest.raises(ValueError, match="at least 2"):
        StatsAccumulator().add(x[:1]).result()
    with pytest.raises(ValueError, match="at least 2"):
        StatsAccumulator().result()


def test_reference_file_round_trip_and_other_tools_read_its_mu_sigma(tmp_path):
    """fmpipe's reference file (FeatureSet.to_bytes) reads back exactly, holds mu/sigma under
    the names pytorch-fid and clean-fid load, and a file of the older mean/cov names still
    reads; one without its moments is refused naming the file."""
    import io
    import json

    from pipeline.eval.extract import FeatureSet

    x = np.random.default_rng(7).standard_normal((40, 5))
    s = FeatureStats.from_features(x)
    features = FeatureSet("net", s, x[:8].astype(np.float32), np.full(40, -1, np.int64))
    data = features.to_bytes()
    back = FeatureSet.from_bytes(data, "ref.npz")
    assert back.n == 40 and back.network_key == "net"
    assert np.array_equal(back.stats.mean, s.mean) and np.array_equal(back.stats.cov, s.cov)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:  # as pytorch-fid reads a .npz
        assert np.array_equal(z["mu"], s.mean) and np.array_equal(z["sigma"], s.cov)
    older = io.BytesIO()
    np.savez(older, n=np.array(40), mean=s.mean, cov=s.cov, kept=features.kept,
             labels=features.labels, meta=np.array(json.dumps({"network_key": "net"})))  # fmt: skip
    assert np.array_equal(FeatureSet.from_bytes(older.getvalue(), "old.npz").stats.cov, s.cov)
    bad = io.BytesIO()
    np.savez(bad, n=np.array(40), meta=np.array(json.dumps({"network_key": "net"})))
    with pytest.raises(ValueError, match=r"bad\.npz is not a feature-statistics file"):
        FeatureSet.from_bytes(bad.getvalue(), "bad.npz")


# --- KID ----------------------------------------------------------------------------


def _mmd2_unbiased_loops(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / m**2


def test_kid_matches_definition_on_one_full_subset():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 3)) + 0.5
    mean, std = kid(x, y, subsets=1, subset_size=50)  # capped at 12: the whole sets
    assert mean == pytest.approx(_mmd2_unbiased_loops(x, y), rel=1e-12)
    assert std == 0.0


def test_kid_same_vs_shifted_distribution():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1000, 16))
    y = rng.standard_normal((1000, 16))
    mean, std = kid(x, y, subsets=50, subset_size=500)
    assert std > 0
    assert abs(mean) < 3 * std
    mean_s, std_s = kid(x, y + 0.5, subsets=50, subset_size=500)
    assert mean_s > 10 * std_s and mean_s > 10 * abs(mean)
    assert kid(x, y, subsets=5, subset_size=100, seed=1) == kid(
        x, y, subsets=5, subset_size=100, seed=1
    )
    assert kid(x, y, subsets=5, subset_size=100, seed=1) != kid(
        x, y, subsets=5, subset_size=100, seed=2
    )


def test_kid_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="dims"):
        kid(x, np.zeros((10, 4)))
    with pytest.raises(ValueError, match=">= 2 rows"):
        kid(x, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="subsets >= 1"):
        kid(x, x, subsets=0)
    with pytest.raises(ValueError, match="non-finite"):
        kid(x, np.full((10, 3), np.inf))


# --- precision / recall -------------------------------------------------------------


def _unit_ball(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * rng.uniform(0, 1, (n, 1)) ** (1 / d)


def _precision_recall_dense(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    d_rf = d_fr.T
    precision = (d_fr <= radii(real)[None]).any(1).mean()
    recall = (d_rf <= radii(fake)[None]).any(1).mean()
    return precision, recall


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(10)
    x = _unit_ball(300, 4, rng)
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_half_outside():
    rng = np.random.default_rng(11)
    d = 2
    real = _unit_ball(2000, d, rng)
    inside = _unit_ball(1000, d, rng)
    far = _unit_ball(1000, d, rng) + np.array([50.0, 0.0])
    fake = np.concatenate([inside, far])
    precision, recall = precision_recall(real, fake, k=3)
    # Half the fakes lie in the real support, and the inside half covers it.
    assert 0.45 <= precision <= 0.5
    assert recall >= 0.95


def test_precision_recall_batching_matches_dense():
    rng = np.random.default_rng(12)
    real = rng.standard_normal((150, 5))
    fake = rng.standard_normal((90, 5)) * 0.7 + 1.0
    dense = _precision_recall_dense(real, fake, k=4)
    assert 0.0 < dense[0] < 1.0 and 0.0 < dense[1] < 1.0
    for batch in (1, 7, 1024):
        got = precision_recall(real, fake, k=4, batch=batch)
        assert got == pytest.approx(dense, abs=1e-12)


def test_precision_recall_errors():
    x = np.zeros((5, 2))
    with pytest.raises(ValueError, match="dims"):
        precision_recall(x, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="more than k=5 fake rows"):
        precision_recall(np.ones((10, 2)), x, k=5)
    with pytest.raises(ValueError, match="k >= 1"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(x, np.full((5, 2), np.nan))
