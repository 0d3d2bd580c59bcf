"""Distribution metrics on feature arrays: Fréchet distance, KID, precision and recall.

Pure numpy functions on (n, d) features; the feature network that makes them, and the job
that stores reference statistics, sit elsewhere. Written from the definitions:

- Fréchet distance (Heusel et al. 2017) between Gaussians fitted to two feature sets.
- Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel.
- Improved precision and recall (Kynkäänniemi et al. 2019): k-NN balls as a support estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    """(n, d) float64 copy of ``x``, or ValueError naming the problem."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) feature array, got shape {x.shape}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values (nan or inf)")
    return x


@dataclass(frozen=True)
class FeatureStats:
    """Sample mean and covariance of n feature vectors.

    Attributes:
        n: number of vectors the statistics were computed from (0: not stated, as in
            published statistics files).
        mean: (d,) float64, mu = (1/n) sum_i x_i.
        cov: (d, d) float64, the unbiased S = (1/(n-1)) sum_i (x_i - mu)(x_i - mu)^T.
    """

    n: int
    mean: np.ndarray
    cov: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        cov = np.asarray(self.cov, dtype=np.float64)
        if mean.ndim != 1:
            raise ValueError(f"FeatureStats.mean must be (d,), got shape {mean.shape}")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"FeatureStats.cov must be ({d}, {d}) for d={d}, got {cov.shape}")
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_features(cls, x: np.ndarray) -> FeatureStats:
        """Statistics of an (n, d) array in one pass (n >= 2)."""
        return StatsAccumulator().add(x).result()


class StatsAccumulator:
    """Streaming mean and covariance in float64 (Chan, Golub and LeVeque's parallel update).

    Keeps n, mu and M2 = sum_i (x_i - mu)(x_i - mu)^T. A batch b is reduced to its own
    (n_b, mu_b, M2_b) around its own mean, then merged: with delta = mu_b - mu_a and
    n = n_a + n_b,

        mu = mu_a + delta n_b / n,     M2 = M2_a + M2_b + delta delta^T n_a n_b / n.

    Sums are never taken around zero, so a large common offset in the features costs no
    precision; batches or workers merged in any grouping agree with one pass to rounding.
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    @property
    def dim(self) -> int | None:
        return None if self._mean is None else int(self._mean.shape[0])

    def _merge_moments(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self._mean is None or self._m2 is None:
            self.n, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        if mean_b.shape != self._mean.shape:
            raise ValueError(
                f"StatsAccumulator holds d={self._mean.shape[0]} features, got d={mean_b.shape[0]}"
            )
        n = self.n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def add(self, batch: np.ndarray) -> StatsAccumulator:
        """Add an (m, d) batch (m may be 0); returns ``self``."""
        x = _as_features(batch, "batch")
        if x.shape[0] == 0:
            if self._mean is not None and x.shape[1] != self._mean.shape[0]:
                raise ValueError(
                    f"StatsAccumulator holds d={self._mean.shape[0]} features, got d={x.shape[1]}"
                )
            return self
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        self._merge_moments(x.shape[0], mean_b, centred.T @ centred)
        return self

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        """Fold in another accumulator (another worker's); returns ``self``."""
        if other._mean is not None and other._m2 is not None:
            self._merge_moments(other.n, other._mean, other._m2)
        return self

    def result(self) -> FeatureStats:
        """The statistics so far; needs n >= 2 for the unbiased covariance M2 / (n - 1)."""
        if self._mean is None or self._m2 is None or self.n < 2:
            raise ValueError(f"FeatureStats need at least 2 feature vectors, got {self.n}")
        cov = self._m2 / (self.n - 1)
        return FeatureStats(n=self.n, mean=self._mean.copy(), cov=(cov + cov.T) / 2)


def _check_stats(s: FeatureStats, name: str) -> None:
    if s.n < 2 and s.n != 0:  # 0: published statistics that state no count
        raise ValueError(f"{name} comes from n={s.n} vectors; a covariance needs n >= 2")
    if not (np.isfinite(s.mean).all() and np.isfinite(s.cov).all()):
        raise ValueError(f"{name} holds non-finite mean or covariance values")


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root V diag(sqrt(max(w, 0))) V^T of a symmetric PSD (d, d) matrix."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet (2-Wasserstein) distance squared between N(mu_a, S_a) and N(mu_b, S_b).

    FD = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2}).

    S_a S_b is not symmetric, but it is similar to C = S_a^{1/2} S_b S_a^{1/2}, which is
    symmetric PSD: Tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i(C)). Both roots come from
    ``eigh`` in float64 with tiny negative eigenvalues (rounding) clipped to 0, and the
    result, >= 0 in exact arithmetic, is clipped to 0 as well.
    """
    _check_stats(a, "first FeatureStats")
    _check_stats(b, "second FeatureStats")
    if a.dim != b.dim:
        raise ValueError(f"frechet_distance needs equal feature dims, got {a.dim} and {b.dim}")
    diff = a.mean - b.mean
    root_a = _psd_sqrt(a.cov)
    c = root_a @ b.cov @ root_a
    eig = np.clip(np.linalg.eigvalsh((c + c.T) / 2), 0.0, None)
    value = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.sqrt(eig).sum())
    return max(value, 0.0)


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(a, b) = (a . b / d + 1)^3 for (m, d) and (l, d) inputs -> (m, l)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kid(
    x: np.ndarray,
    y: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a cubic polynomial kernel.

    For subsets X, Y of m rows each (drawn without replacement from ``x`` and ``y``),

        MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1))
                  - 2 sum_{i, j} k(x_i, y_j) / m^2,

    k(a, b) = (a . b / d + 1)^3. Unbiased, so it can be slightly negative for equal
    distributions.

    Args:
        x, y: (n_x, d) and (n_y, d) features.
        subsets: number of random subset pairs.
        subset_size: m, capped at min(n_x, n_y); must end up >= 2.
        seed: seeds the ``numpy.random.Generator`` that draws the subsets.

    Returns:
        (mean, std) of MMD^2_u over the subsets (std with ddof=0; 0 for one subset).
    """
    x = _as_features(x, "x")
    y = _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid needs equal feature dims, got {x.shape[1]} and {y.shape[1]}")
    if subsets < 1:
        raise ValueError(f"kid needs subsets >= 1, got {subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(
            f"kid needs subsets of >= 2 rows; subset_size={subset_size}, "
            f"len(x)={x.shape[0]}, len(y)={y.shape[0]}"
        )
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        k_xx = _poly_kernel(xs, xs)
        k_yy = _poly_kernel(ys, ys)
        k_xy = _poly_kernel(xs, ys)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[s] = within - 2.0 * k_xy.sum() / (m * m)
    return float(values.mean()), float(values.std())


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, l) squared distances ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j, clipped at 0."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0, out=d2)


def _knn_radii2(x: np.ndarray, k: int, batch: int) -> np.ndarray:
    """(n,) squared distance from each row of x to its k-th nearest other row."""
    n = x.shape[0]
    radii2 = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        d2 = _sq_dists(x[start:stop], x)
        rows = np.arange(stop - start)
        d2[rows, rows + start] = np.inf  # a point is not its own neighbour
        radii2[start:stop] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return radii2


def _coverage(support: np.ndarray, radii2: np.ndarray, query: np.ndarray, batch: int) -> float:
    """Share of query rows within radius of at least one support row (ball boundary in)."""
    inside = 0
    for start in range(0, query.shape[0], batch):
        d2 = _sq_dists(query[start : start + batch], support)
        inside += int((d2 <= radii2[None, :]).any(axis=1).sum())
    return inside / query.shape[0]


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each real point r_i gets the ball of radius rho_k(r_i), the distance to its k-th nearest
    other real point; the union of those balls estimates the real support. Precision is
    the share of fake points inside at least one real ball; recall is the same with the
    roles swapped (real points inside the union of fake k-NN balls).

    Distances are computed in float64 as ||a||^2 + ||b||^2 - 2 a . b on inputs shifted by
    the real mean, in row blocks of ``batch`` (memory O(batch * max(n_real, n_fake))). A
    point whose distance to a ball's edge is within about 1e-12 of the squared radius can
    land on either side; counts may differ from exact arithmetic only for such points.

    Args:
        real, fake: (n_real, d) and (n_fake, d) features; each needs more than k rows.
        k: neighbour rank that sets the radii.
        batch: rows of pairwise distances held at once.

    Returns:
        (precision, recall), each in [0, 1].
    """
    real = _as_features(real, "real")
    fake = _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision_recall needs equal feature dims, got {real.shape[1]} and {fake.shape[1]}"
        )
    if k < 1:
        raise ValueError(f"precision_recall needs k >= 1, got {k}")
    if batch < 1:
        raise ValueError(f"precision_recall needs batch >= 1, got {batch}")
    for name, arr in (("real", real), ("fake", fake)):
        if arr.shape[0] <= k:
            raise ValueError(
                f"precision_recall needs more than k={k} {name} rows, got {arr.shape[0]}"
            )
    shift = real.mean(axis=0)
    real = real - shift
    fake = fake - shift
    precision = _coverage(real, _knn_radii2(real, k, batch), fake, batch)
    recall = _coverage(fake, _knn_radii2(fake, k, batch), real, batch)
    return precision, recall
