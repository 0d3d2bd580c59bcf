"""Scores of a candidate feature set against a reference: the figures an evaluation reports.

Every figure carries the sample counts it was computed from (FID of 1,000 samples is not
FID of 50,000: the estimator is biased upward at small n), so tables and MLflow keep them
side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from pipeline.eval.extract import FeatureSet
from pipeline.eval.frechet import frechet_distance, kid, precision_recall

__all__ = ["ClassScore", "Scores", "mean_scores", "score"]


@dataclass(frozen=True)
class ClassScore:
    """Conditional accuracy of one class: the share of its samples classified as it."""

    accuracy: float
    n: int


@dataclass
class Scores:
    """The figures of one evaluation (``fd`` is FID when the network is Inception).

    Attributes:
        network: the feature network's key.
        fd: Fréchet distance between the Gaussians of all n candidate / reference features.
        kid, kid_std: KID mean and std over subsets of the kept rows (x 1e3 is customary;
            stored raw).
        precision, recall: k-NN manifold estimates on the kept rows.
        accuracy, confidence: conditional accuracy and mean max-probability (classifier
            network on labelled samples only).
        per_class: class id -> :class:`ClassScore`.
        n, n_reference: samples behind fd; n_kept, n_reference_kept: behind kid and p/r.
    """

    network: str
    fd: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    n: int
    n_reference: int
    n_kept: int
    n_reference_kept: int
    accuracy: float | None = None
    confidence: float | None = None
    per_class: dict[int, ClassScore] = field(default_factory=dict)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: value}`` for MLflow (``prefix`` e.g. ``"eval/"``)."""
        out = {
            "fd": self.fd,
            "kid": self.kid,
            "precision": self.precision,
            "recall": self.recall,
            "n": float(self.n),
            "n_reference": float(self.n_reference),
        }
        if self.accuracy is not None and self.confidence is not None:
            out["accuracy"], out["confidence"] = self.accuracy, self.confidence
        # A figure not computed (NaN: a statistics-only reference) or a count not known (0)
        # is left out rather than logged as a number.
        known = {k: v for k, v in out.items() if v == v and not (k == "n_reference" and v == 0)}
        return {f"{prefix}{k}": float(v) for k, v in known.items()}

    def to_dict(self) -> dict[str, object]:
        body = asdict(self)
        body["per_class"] = {str(k): asdict(v) for k, v in self.per_class.items()}
        return body

    def table(self, title: str) -> str:
        """A short plain-text table for the console."""
        against = f"{self.n_reference:,} reference" if self.n_reference else "published statistics"
        lines = [
            f"{title} ({self.network}; {self.n:,} samples vs {against})",
            f"  Fréchet distance   {self.fd:10.4f}",
        ]
        if self.kid != self.kid:  # NaN: score() had no feature rows to compare
            lines.append("  KID, precision / recall: not computed (no feature rows to compare)")
        else:
            lines += [
                f"  KID x 1e3          {1e3 * self.kid:10.4f} ± {1e3 * self.kid_std:.4f}"
                f"   ({self.n_kept:,} vs {self.n_reference_kept:,} kept)",
                f"  precision / recall {self.precision:10.4f} / {self.recall:.4f}",
            ]
        if self.accuracy is not None:
            lines.append(
                f"  cond. accuracy     {self.accuracy:10.4f}  confidence {self.confidence:.4f}"
            )
        return "\n".join(lines)


def mean_scores(runs: Sequence[Scores]) -> Scores:
    """The figures of one model averaged over evaluations at several seeds (same network,
    same counts): FD, KID, its std, precision, recall, accuracy and confidence are the
    seeds' means; ``per_class`` is dropped (a mean over seeds is not a count of samples)."""
    if not runs:
        raise ValueError("mean_scores needs at least one Scores")
    networks = {r.network for r in runs}
    if len(networks) > 1:
        raise ValueError(f"cannot average scores of different networks: {sorted(networks)}")

    def mean(name: str) -> float | None:
        values = [getattr(r, name) for r in runs]
        return None if None in values else float(np.mean(values))

    return replace(
        runs[0],
        fd=mean("fd"), kid=mean("kid"), kid_std=mean("kid_std"), precision=mean("precision"),
        recall=mean("recall"), accuracy=mean("accuracy"), confidence=mean("confidence"),
        per_class={},
    )  # fmt: skip


def _per_class(labels: np.ndarray, predicted: np.ndarray) -> dict[int, ClassScore]:
    out: dict[int, ClassScore] = {}
    for c in np.unique(labels):
        hit = predicted[labels == c] == c
        out[int(c)] = ClassScore(float(hit.mean()), int(hit.size))
    return out


def score(
    candidate: FeatureSet,
    reference: FeatureSet,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    seed: int = 0,
) -> Scores:
    """All figures of ``candidate`` against ``reference`` (same network required).

    Raises:
        ValueError: the two sets come from different networks, or fewer than 2 kept rows.
    """
    if candidate.network_key != reference.network_key:
        raise ValueError(
            f"candidate features come from {candidate.network_key!r}, reference from "
            f"{reference.network_key!r}: compare sets of one network"
        )
    if candidate.stats.mean.shape != reference.stats.mean.shape:
        raise ValueError(
            f"candidate features are {candidate.stats.mean.shape[0]}-d, the reference's "
            f"{reference.stats.mean.shape[0]}-d: compare sets of one network"
        )
    m = min(kid_subset_size, len(candidate.kept), len(reference.kept))
    if m < 2:  # statistics only (published mu/sigma): no rows for KID or the k-NN balls
        # (Scores.table and Scores.metrics read the NaN as "not computed")
        kid_mean = kid_std = precision = recall = float("nan")
    else:
        kid_mean, kid_std = kid(candidate.kept, reference.kept, subsets=kid_subsets,
                                subset_size=m, seed=seed)  # fmt: skip
        # k-NN balls need k other points: a set smaller than k + 1 rows gets a smaller k.
        k = max(1, min(k, len(candidate.kept) - 1, len(reference.kept) - 1))
        precision, recall = precision_recall(reference.kept, candidate.kept, k=k)
    scores = Scores(
        network=candidate.network_key,
        fd=frechet_distance(candidate.stats, reference.stats),
        kid=kid_mean,
        kid_std=kid_std,
        precision=precision,
        recall=recall,
        n=candidate.n,
        n_reference=reference.n,
        n_kept=len(candidate.kept),
        n_reference_kept=len(reference.kept),
    )
    labelled = candidate.labels >= 0
    if candidate.predicted is not None and candidate.confidence is not None and labelled.any():
        hit = candidate.predicted[labelled] == candidate.labels[labelled]
        scores.accuracy = float(hit.mean())
        scores.confidence = float(candidate.confidence[labelled].mean())
        scores.per_class = _per_class(candidate.labels[labelled], candidate.predicted[labelled])
    return scores
