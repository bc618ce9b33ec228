"""How good probabilities were once the outcomes are known: ROC AUC, Brier, log loss, calibration.

numpy only, so the service computes its live accuracy with the very functions the exporter reports
offline accuracy with (``model_export.metrics`` imports them): the same users, scores and labels
give the same numbers online and offline. AUC is the Mann-Whitney statistic from tie groups of the
score (ties count one half), which is what sklearn's ``roc_auc_score`` reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: Keeps log loss finite (the baselines clip their probabilities to it too); the resolution of the
#: network's float32 outputs near 1.
PROBA_EPS = 1e-7
#: Groups of the calibration table: deciles of the predicted probability.
CALIBRATION_GROUPS = 10


def as_labels(y: ArrayLike) -> NDArray[np.int64]:
    """``y`` as a flat 0/1 array; anything else is a ValueError."""
    arr = np.asarray(y).reshape(-1)
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError("labels must be 0/1")
    return arr.astype(np.int64)


def as_scores(p: ArrayLike, n: int) -> NDArray[np.float64]:
    """``p`` as ``n`` finite float64 scores; anything else is a ValueError."""
    arr = np.asarray(p, dtype=np.float64).reshape(-1)
    if arr.size != n:
        raise ValueError(f"got {arr.size} scores for {n} labels")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores must be finite")
    return arr


def tie_groups(p: NDArray[np.float64]) -> tuple[NDArray[np.int64], int]:
    """Group id per user, ascending in score; equal scores share a group."""
    _, inverse = np.unique(p, return_inverse=True)
    group = inverse.astype(np.int64).reshape(-1)
    return group, int(group.max()) + 1 if group.size else 0


def auc_from_groups(pos: NDArray[np.float64], neg: NDArray[np.float64]) -> NDArray[np.float64]:
    """Mann-Whitney AUC from positive / negative counts per ascending tie group (last axis).

    Each positive beats every negative in a lower group and ties with half of those in its own.
    NaN where a row has no positive or no negative. Counts are integers (or halves), so the sums
    are exact in float64 far beyond any realistic number of users, whatever order users came in.
    """
    neg_below = np.cumsum(neg, axis=-1) - neg
    wins = np.sum(pos * (neg_below + 0.5 * neg), axis=-1)
    pairs = np.sum(pos, axis=-1) * np.sum(neg, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)
    return np.asarray(auc, dtype=np.float64)


def roc_auc(y: ArrayLike, p: ArrayLike) -> float:
    """ROC AUC by ranks (ties count one half); equals sklearn's ``roc_auc_score``."""
    labels = as_labels(y)
    scores = as_scores(p, labels.size)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("ROC AUC needs both classes in y")
    group, n_groups = tie_groups(scores)
    pos = np.bincount(group, weights=labels, minlength=n_groups).astype(np.float64)
    neg = np.bincount(group, minlength=n_groups).astype(np.float64) - pos
    return float(auc_from_groups(pos, neg))


def brier(y: ArrayLike, p: ArrayLike) -> float:
    """Mean squared error of the probabilities."""
    labels = as_labels(y)
    scores = as_scores(p, labels.size)
    return float(np.mean((scores - labels) ** 2))


def log_loss(y: ArrayLike, p: ArrayLike) -> float:
    """Mean negative log-likelihood, probabilities clipped to ``[PROBA_EPS, 1 - PROBA_EPS]``."""
    labels = as_labels(y)
    clipped = np.clip(as_scores(p, labels.size), PROBA_EPS, 1.0 - PROBA_EPS)
    return -float(np.mean(labels * np.log(clipped) + (1 - labels) * np.log1p(-clipped)))


@dataclass(frozen=True)
class CalibrationGroup:
    """One decile of the users by predicted probability: its range, size, mean prediction and the
    rate at which its users turned out positive."""

    decile: int  # 1 = the lowest predictions
    lower: float  # lowest prediction in the group
    upper: float  # highest
    count: int
    mean_predicted: float
    observed_rate: float


def calibration_deciles(
    y: ArrayLike, p: ArrayLike, groups: int = CALIBRATION_GROUPS
) -> list[CalibrationGroup]:
    """Users sorted by prediction and cut into ``groups`` groups of (nearly) equal size.

    Sorted by prediction, then label, so tied predictions split between groups the same way in
    whatever order the users arrive (a live window and an offline file list them differently).
    Fewer users than groups give fewer, non-empty groups.
    """
    labels = as_labels(y)
    scores = as_scores(p, labels.size)
    order = np.lexsort((labels, scores))
    out: list[CalibrationGroup] = []
    for k, part in enumerate(np.array_split(order, min(groups, labels.size))):
        ps, ys = scores[part], labels[part]
        out.append(
            CalibrationGroup(
                decile=k + 1,
                lower=float(ps[0]),
                upper=float(ps[-1]),
                count=int(part.size),
                mean_predicted=float(ps.mean()),
                observed_rate=float(ys.mean()),
            )
        )
    return out


@dataclass(frozen=True)
class Quality:
    """What a set of predictions with known outcomes says about the model."""

    count: int
    positives: int
    base_rate: float  # observed positive rate
    mean_predicted: float
    roc_auc: float  # NaN while only one class has been seen
    brier: float
    log_loss: float
    calibration: list[CalibrationGroup]


def quality(y: ArrayLike, p: ArrayLike) -> Quality:
    """Every measure above for labels ``y`` and predictions ``p`` (at least one user)."""
    labels = as_labels(y)
    scores = as_scores(p, labels.size)
    if labels.size == 0:
        raise ValueError("quality needs at least one user")
    positives = int(labels.sum())
    return Quality(
        count=int(labels.size),
        positives=positives,
        base_rate=positives / labels.size,
        mean_predicted=float(scores.mean()),
        roc_auc=roc_auc(labels, scores) if 0 < positives < labels.size else math.nan,
        brier=brier(labels, scores),
        log_loss=log_loss(labels, scores),
        calibration=calibration_deciles(labels, scores),
    )
