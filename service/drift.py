"""Score drift: served probabilities against the distribution the model gave its evaluation users.

The exporter writes a :class:`ScoreReference` into the model file (decile edges with the share of
evaluation users in each bin, and the reference CDF on a fine quantile grid). The service keeps a
bounded ring of recent scores per model version (:class:`ScoreWindow`) and compares it with the
reference: PSI over the decile bins, and the Kolmogorov-Smirnov statistic on the quantile grid,
which is within one grid step (1 / :data:`GRID_STEPS`) of the exact two-sample statistic. numpy
only: the exporter builds references with it, the service reads them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: Bins of the reference: deciles of the evaluation users' scores.
REFERENCE_BINS = 10
#: Steps of the quantile grid the reference CDF is kept on (the KS statistic's resolution).
GRID_STEPS = 1000
#: Floor on a bin's share in PSI: an empty bin would make it infinite. The Prometheus recording
#: rule that recomputes PSI (deploy/rules.yml) clamps by the same floor.
PSI_FLOOR = 1e-4


def _bin_index(edges: NDArray[np.float64], scores: NDArray[np.float64]) -> NDArray[np.intp]:
    # side="left": a score equal to an edge belongs to the bin that edge closes (Prometheus' le)
    return np.searchsorted(edges, scores, side="left")


@dataclass(frozen=True)
class ScoreReference:
    """How the model scored its evaluation users.

    Bin ``k`` holds the scores in ``(edges[k - 1], edges[k]]`` (the first bin everything up to
    ``edges[0]``, the last everything above ``edges[-1]``): a Prometheus histogram with the edges
    as buckets counts exactly these bins. ``grid`` holds distinct scores, ``cdf`` the exact
    fraction of evaluation users scored at or below each.
    """

    count: int
    edges: tuple[float, ...]
    proportions: tuple[float, ...]  # one more than edges; sums to 1
    grid: tuple[float, ...]
    cdf: tuple[float, ...]

    @classmethod
    def of(cls, scores: ArrayLike) -> ScoreReference:
        values = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise ValueError("a score reference needs finite scores")
        inner = np.arange(1, REFERENCE_BINS) / REFERENCE_BINS
        # Each edge is a score, so the bin it closes holds at least that one; tied deciles merge,
        # and an edge at the top score would leave the last bin empty.
        edges = np.unique(np.quantile(values, inner, method="inverted_cdf"))
        edges = edges[edges < values[-1]]
        counts = np.bincount(_bin_index(edges, values), minlength=edges.size + 1)
        grid = np.unique(np.quantile(values, np.linspace(0.0, 1.0, GRID_STEPS + 1), method="inverted_cdf"))
        cdf = np.searchsorted(values, grid, side="right") / values.size
        return cls(
            count=int(values.size),
            edges=tuple(float(e) for e in edges),
            proportions=tuple(float(c) / values.size for c in counts),
            grid=tuple(float(g) for g in grid),
            cdf=tuple(float(c) for c in cdf),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "edges": list(self.edges),
            "proportions": list(self.proportions),
            "grid": list(self.grid),
            "cdf": list(self.cdf),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreReference:
        """Parse and check one; ValueError (or KeyError, TypeError) when it is malformed."""
        ref = cls(
            count=int(data["count"]),
            edges=tuple(float(x) for x in data["edges"]),
            proportions=tuple(float(x) for x in data["proportions"]),
            grid=tuple(float(x) for x in data["grid"]),
            cdf=tuple(float(x) for x in data["cdf"]),
        )
        numbers = (*ref.edges, *ref.proportions, *ref.grid, *ref.cdf)
        if ref.count < 1 or not all(math.isfinite(x) for x in numbers):
            raise ValueError("score reference: count < 1 or a non-finite number")
        if len(ref.proportions) != len(ref.edges) + 1 or abs(sum(ref.proportions) - 1.0) > 1e-9:
            raise ValueError("score reference: proportions must be one more than edges and sum to 1")
        if list(ref.edges) != sorted(set(ref.edges)) or list(ref.grid) != sorted(set(ref.grid)):
            raise ValueError("score reference: edges and grid must be strictly increasing")
        if (
            len(ref.cdf) != len(ref.grid)
            or not ref.grid
            or list(ref.cdf) != sorted(ref.cdf)
            or ref.cdf[-1] != 1.0
        ):
            raise ValueError("score reference: cdf must match the grid, be non-decreasing and end at 1")
        return ref


def bin_counts(reference: ScoreReference, scores: NDArray[np.float64]) -> NDArray[np.int64]:
    """How many of ``scores`` fall in each reference bin."""
    edges = np.asarray(reference.edges, dtype=np.float64)
    return np.bincount(_bin_index(edges, scores), minlength=edges.size + 1).astype(np.int64)


def psi(reference: ScoreReference, scores: NDArray[np.float64]) -> float:
    """Population stability index of ``scores`` against the reference, over its bins."""
    live = np.maximum(bin_counts(reference, scores) / max(scores.size, 1), PSI_FLOOR)
    ref = np.maximum(np.asarray(reference.proportions), PSI_FLOOR)
    return float(np.sum((live - ref) * np.log(live / ref)))


def ks(reference: ScoreReference, scores: NDArray[np.float64]) -> float:
    """Kolmogorov-Smirnov statistic of ``scores`` against the reference CDF on its grid.

    Both CDFs are compared at each grid point; just below a point, where the reference is only
    known to lie between its values at the previous point and at this one, the live CDF is
    compared with that interval. Above the grid the reference CDF is 1.
    """
    values = np.sort(scores)
    grid = np.asarray(reference.grid)
    cdf = np.asarray(reference.cdf)
    n = max(values.size, 1)
    at = np.searchsorted(values, grid, side="right") / n
    below = np.searchsorted(values, grid, side="left") / n
    before = np.concatenate([[0.0], cdf[:-1]])
    outside = np.maximum(np.maximum(before - below, below - cdf), 0.0)
    return float(max(np.max(np.abs(at - cdf)), np.max(outside), 1.0 - at[-1]))


class ScoreWindow:
    """The most recent ``capacity`` scores of one model version, overwritten oldest first.

    Written in bulk by one task (``extend`` with a whole array), so no per-score work happens on the
    request path; not thread-safe on its own.
    """

    def __init__(self, capacity: int) -> None:
        self._values = np.zeros(capacity, dtype=np.float64)
        self._next = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def extend(self, scores: NDArray[np.float64]) -> None:
        capacity = self._values.size
        tail = scores[-capacity:]  # older ones would be overwritten in this very call
        start = self._next
        first = min(tail.size, capacity - start)
        self._values[start : start + first] = tail[:first]
        self._values[: tail.size - first] = tail[first:]
        self._next = (start + tail.size) % capacity
        self._filled = min(capacity, self._filled + tail.size)

    def values(self) -> NDArray[np.float64]:
        """The scores held, in no particular order."""
        return self._values[: self._filled]
