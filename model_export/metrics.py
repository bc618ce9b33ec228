"""Scores of a probability model: ranking and thresholded metrics, a paired bootstrap, calibration.

Every model is scored on the same users, so comparisons use a *paired* bootstrap: one set of
resampled users per replicate, both models' AUCs computed on it. AUC is computed from tie groups
of the score with per-user counts, which makes a replicate a couple of bincounts and a cumsum
instead of a sort, and gives exactly the Mann-Whitney statistic (ties count one half), the same
number sklearn's ``roc_auc_score`` reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.metrics import average_precision_score, precision_recall_curve

# The measures the service also computes live are the service's own numpy code, so offline and
# online numbers come from one implementation; so is the score reference written for drift.
from service.drift import ScoreReference
from service.quality import (
    PROBA_EPS,
    as_labels,
    as_scores,
    auc_from_groups,
    brier,
    log_loss,
    roc_auc,
    tie_groups,
)

__all__ = [
    "METRIC_KEYS",
    "PROBA_EPS",
    "AucDiff",
    "BinaryMetrics",
    "ReliabilityBin",
    "ScoreReference",
    "as_labels",
    "as_scores",
    "best_f1_threshold",
    "binary_metrics",
    "bootstrap_auc_diffs",
    "calibration_error",
    "expected_calibration_error",
    "paired_bootstrap_auc",
    "reliability_table",
    "roc_auc",
    "summarise_diffs",
]


@dataclass(frozen=True)
class BinaryMetrics:
    """What :func:`binary_metrics` measures, in the order reports show it."""

    roc_auc: float
    pr_auc: float
    log_loss: float
    brier: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    threshold: float


METRIC_KEYS: tuple[str, ...] = tuple(f.name for f in fields(BinaryMetrics))


@dataclass(frozen=True)
class AucDiff:
    """A paired bootstrap of AUC(a) - AUC(b); ``n_boot`` counts the replicates that drew both classes."""

    auc_diff: float
    ci95: tuple[float, float]
    n_boot: int
    p_value_one_sided: float


@dataclass(frozen=True)
class ReliabilityBin:
    """Users whose predicted probability falls in ``[bin_lower, bin_upper)`` (the top bin is closed)."""

    bin_lower: float
    bin_upper: float
    count: int
    mean_predicted: float
    observed_rate: float


#: Bootstrap draws (users x replicates) per vectorised chunk: bounds the working set to ~100 MB.
_BOOT_CHUNK_DRAWS = 1_500_000


def best_f1_threshold(y: ArrayLike, p: ArrayLike) -> float:
    """The score value ``t`` whose rule ``p >= t`` has the highest F1 (pick it on validation).

    Thresholds come from the precision-recall curve, so each is an actual score and applying it
    reproduces the F1 found here exactly; ties go to the lowest such threshold.
    """
    labels = as_labels(y)
    scores = as_scores(p, labels.size)
    if labels.sum() == 0:
        raise ValueError("best F1 threshold needs at least one positive")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # the curve's last point (precision 1, recall 0) has no threshold
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def binary_metrics(y: ArrayLike, p: ArrayLike, threshold: float) -> BinaryMetrics:
    """Ranking, probabilistic and thresholded metrics for one model.

    A user is predicted positive when ``p >= threshold``. Precision is 0 (not a warning) when
    nothing is predicted positive, so a degenerate threshold shows up as a number in the report.
    """
    labels = as_labels(y)
    scores = as_scores(p, labels.size)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError("metrics need both classes in y (AUC and average precision are undefined)")

    predicted = scores >= threshold
    positive = labels == 1
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    fn = int(np.sum(~predicted & positive))
    tn = int(labels.size - tp - fp - fn)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
    return BinaryMetrics(
        roc_auc=roc_auc(labels, scores),
        pr_auc=float(average_precision_score(labels, scores)),
        log_loss=log_loss(labels, scores),
        brier=brier(labels, scores),
        accuracy=(tp + tn) / labels.size,
        precision=precision,
        recall=recall,
        f1=f1,
        threshold=float(threshold),
    )


def bootstrap_auc_diffs(
    y: ArrayLike,
    p_a: ArrayLike,
    p_b: ArrayLike,
    n_boot: int = 2000,
    seed: int = 0,
) -> NDArray[np.float64]:
    """AUC(a) - AUC(b) on ``n_boot`` paired resamples of the users (NaN where a draw has one class).

    The same ``seed`` and user count give the same draws whatever the scores, so replicate ``k`` of
    several comparisons (or several evaluation dates) can be combined, e.g. averaged across dates.
    """
    aucs = bootstrap_aucs(y, {"a": p_a, "b": p_b}, n_boot, seed)
    return aucs["a"] - aucs["b"]


def bootstrap_aucs(
    y: ArrayLike, scores: Mapping[str, ArrayLike], n_boot: int = 2000, seed: int = 0
) -> dict[str, NDArray[np.float64]]:
    """Each model's AUC on ``n_boot`` resamples of the users (NaN where a draw has one class).

    The draws depend on ``seed`` and the user count only, so replicate ``k`` of any two calls is the
    same sample: ``a - b`` of two models' results is their paired bootstrap, whether they were
    scored in one call or in two (the models' scores may come at different times).
    """
    labels = as_labels(y)
    models = [as_scores(p, labels.size) for p in scores.values()]
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = labels.size
    # A replicate is a count per user; resampling users only changes the counts, so each model's
    # AUC is per-group class counts and a cumsum, with no re-sorting. Tie group and class share one
    # code (2 * group + label): one gather and one bincount per model and replicate.
    codes = []
    for p in models:
        group, n_groups = tie_groups(p)
        codes.append((2 * group + labels, 2 * n_groups))
    rng = np.random.default_rng(seed)
    aucs: list[list[NDArray[np.float64]]] = [[] for _ in models]
    chunk = max(1, _BOOT_CHUNK_DRAWS // max(n, 1))
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(rows, n))  # [rows, n] users drawn per replicate
        row_of = np.arange(rows, dtype=np.int64)[:, None]
        for (code, n_codes), out in zip(codes, aucs, strict=True):
            drawn = code[idx] if rows == 1 else row_of * n_codes + code[idx]
            counts = np.bincount(drawn.ravel(), minlength=rows * n_codes).reshape(rows, n_codes // 2, 2)
            neg = np.ascontiguousarray(counts[:, :, 0], dtype=np.float64)
            pos = np.ascontiguousarray(counts[:, :, 1], dtype=np.float64)
            out.append(auc_from_groups(pos, neg))
    return {name: np.concatenate(out) for name, out in zip(scores, aucs, strict=True)}


def summarise_diffs(point: float, diffs: NDArray[np.float64]) -> AucDiff:
    """Point difference, 95% percentile interval and one-sided p-value of bootstrap replicates."""
    kept = diffs[np.isfinite(diffs)]
    if kept.size == 0:
        raise ValueError("every bootstrap replicate drew a single class; need more users")
    lo, hi = np.percentile(kept, [2.5, 97.5])
    return AucDiff(
        auc_diff=float(point),
        ci95=(float(lo), float(hi)),
        n_boot=int(kept.size),
        p_value_one_sided=float(np.mean(kept <= 0.0)),
    )


def paired_bootstrap_auc(
    y: ArrayLike,
    p_a: ArrayLike,
    p_b: ArrayLike,
    n_boot: int = 2000,
    seed: int = 0,
) -> AucDiff:
    """Paired bootstrap of AUC(a) - AUC(b): resample users, score both models on the same sample.

    Returns the full-data difference, a 95% percentile interval, the number of replicates used
    (replicates that drew a single class are skipped) and the one-sided p-value: the fraction of
    replicates where model a is not better (diff <= 0).
    """
    diffs = bootstrap_auc_diffs(y, p_a, p_b, n_boot, seed)
    return summarise_diffs(roc_auc(y, p_a) - roc_auc(y, p_b), diffs)


def reliability_table(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> list[ReliabilityBin]:
    """Observed positive rate per equal-width bin of predicted probability on ``[0, 1]``.

    Empty bins are omitted, so ``count`` sums to the number of users. A prediction of exactly 1
    falls in the last bin.
    """
    labels = as_labels(y)
    scores = as_scores(p, labels.size)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if np.any((scores < 0.0) | (scores > 1.0)):
        raise ValueError("reliability needs probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.minimum((scores * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    sum_p = np.bincount(bins, weights=scores, minlength=n_bins)
    sum_y = np.bincount(bins, weights=labels, minlength=n_bins)
    return [
        ReliabilityBin(
            bin_lower=float(edges[k]),
            bin_upper=float(edges[k + 1]),
            count=int(count[k]),
            mean_predicted=float(sum_p[k] / count[k]),
            observed_rate=float(sum_y[k] / count[k]),
        )
        for k in np.flatnonzero(count)
    ]


def calibration_error(bins: Sequence[ReliabilityBin]) -> float:
    """Count-weighted mean |mean predicted - observed rate| over ``bins`` (NaN when they are empty)."""
    n = sum(b.count for b in bins)
    if n == 0:
        return math.nan
    gap = sum(b.count * abs(b.mean_predicted - b.observed_rate) for b in bins)
    return float(gap / n)


def expected_calibration_error(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> float:
    """:func:`calibration_error` of the reliability bins of ``p``."""
    return calibration_error(reliability_table(y, p, n_bins))
