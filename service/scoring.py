"""Parsed requests -> columns -> features -> probabilities: the HTTP-free core of a prediction.

Featurisation is always :func:`service.features.encode_batch` with the served model's own feature
spec, the same call the exporter used to score users offline; that is what makes an online score
and an offline score of the same user at the same ``as_of`` identical.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.features import FoldedHistory, encode_batch
from service.metrics import Metrics
from service.predictor import Predictor
from service.schemas import PredictRequest
from service.timestamps import all_in_range, in_range


@dataclass(frozen=True)
class EventColumns:
    """Many users' events as flat columns: user ``i`` owns ``[offsets[i], offsets[i + 1])``."""

    timestamps: NDArray[np.int64]  # epoch seconds, UTC
    amounts: NDArray[np.float64]
    quantities: NDArray[np.float64]
    offsets: NDArray[np.int64]  # [n_users + 1]
    as_of: NDArray[np.int64]  # [n_users], epoch seconds
    folded: FoldedHistory | None = None  # compacted counters of stored histories

    @property
    def n_users(self) -> int:
        return int(self.offsets.size - 1)


def to_columns(users: Sequence[PredictRequest], now: int) -> EventColumns:
    """Flatten validated users into columns; ``now`` (epoch seconds) stands in for a missing ``as_of``.

    This is the one per-event Python loop left (reading attributes off validated objects); the
    encoder works on the columns with no per-event Python at all. Event timestamps are not
    range-checked here: call :func:`out_of_range` on the result.
    """
    if len(users) == 1:
        return _one_user(users[0], now)
    n = len(users)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(u.events or ()) for u in users], out=offsets[1:])
    events = [e for u in users for e in u.events or ()]
    # one list per column, then one conversion each: cheaper than np.fromiter over generators
    # aware datetimes -> float epoch seconds -> floor: exact to the second up to LATEST, where the
    # microseconds since the epoch are still fewer than 2**53
    seconds = np.array([e.timestamp.timestamp() for e in events], dtype=np.float64)
    as_of = np.array([now if u.as_of is None else u.as_of.timestamp() for u in users], dtype=np.float64)
    return EventColumns(
        timestamps=np.floor(seconds).astype(np.int64),
        amounts=np.array([e.amount for e in events], dtype=np.float64),
        quantities=np.array([e.quantity for e in events], dtype=np.float64),
        offsets=offsets,
        as_of=np.floor(as_of).astype(np.int64),
    )


_NONE = np.zeros(0, dtype=np.int64)
_NONE.flags.writeable = False


def _one_user(user: PredictRequest, now: int) -> EventColumns:
    """:func:`to_columns` for the single-user ``/predict``, without the flattening it does not need."""
    events = user.events or ()
    seconds = np.array([e.timestamp.timestamp() for e in events], dtype=np.float64)
    as_of = now if user.as_of is None else math.floor(user.as_of.timestamp())
    return EventColumns(
        timestamps=np.floor(seconds).astype(np.int64),
        amounts=np.array([e.amount for e in events], dtype=np.float64),
        quantities=np.array([e.quantity for e in events], dtype=np.float64),
        offsets=np.array([0, len(events)], dtype=np.int64),
        as_of=np.array([as_of], dtype=np.int64),
    )


def out_of_range(
    columns: EventColumns,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Timestamps outside the range (``service.timestamps``): events as ``(user index, index within the
    user)``, then the users whose ``as_of`` is out. One vectorised pass, not a call per value."""
    ts = columns.timestamps
    as_of = columns.as_of
    if all_in_range(ts) and all_in_range(as_of):
        return _NONE, _NONE, _NONE
    bad = np.flatnonzero(~in_range(ts))
    users = np.searchsorted(columns.offsets, bad, side="right") - 1
    bad_as_of = np.flatnonzero(~in_range(as_of))
    return users.astype(np.int64), (bad - columns.offsets[users]).astype(np.int64), bad_as_of.astype(np.int64)


def concat_columns(parts: Sequence[EventColumns]) -> EventColumns:
    """Several requests' columns as one batch, users in the order given (the micro-batcher's join)."""
    if len(parts) == 1:
        return parts[0]
    counts = np.concatenate([np.diff(p.offsets) for p in parts])
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    folded = None
    if any(p.folded is not None for p in parts):  # stored histories that were compacted
        each = [p.folded if p.folded is not None else FoldedHistory.empty(p.n_users) for p in parts]
        folded = FoldedHistory(*(np.concatenate([getattr(f, name) for f in each]) for name in _FOLDED_FIELDS))
    return EventColumns(
        timestamps=np.concatenate([p.timestamps for p in parts]),
        amounts=np.concatenate([p.amounts for p in parts]),
        quantities=np.concatenate([p.quantities for p in parts]),
        offsets=offsets,
        as_of=np.concatenate([p.as_of for p in parts]),
        folded=folded,
    )


_FOLDED_FIELDS = tuple(f.name for f in dataclasses.fields(FoldedHistory))


class Scorer:
    """Encodes and scores a batch of users in one inference call, recording what it did."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def score(self, predictor: Predictor, columns: EventColumns) -> NDArray[np.float32]:
        """``float32 [n_users]`` probabilities, in the order of ``columns``."""
        m = self._metrics
        t0 = time.perf_counter()
        features = encode_batch(
            columns.timestamps,
            columns.amounts,
            columns.quantities,
            columns.offsets,
            columns.as_of,
            predictor.metadata.feature_spec,
            columns.folded,
        )
        t1 = time.perf_counter()
        probabilities = predictor.predict(features)
        t2 = time.perf_counter()
        n = columns.n_users
        if probabilities.shape != (n,) or not np.all(np.isfinite(probabilities)):
            # Warm-up checked the model on zeros; real inputs are bounded by the schema, so this is
            # a model bug, and a 500 is more honest than a NaN (or null) probability.
            raise RuntimeError(f"model returned {probabilities.shape} non-finite or misshapen output")
        m.encoding_duration.observe(t1 - t0)
        m.inference_duration.observe(t2 - t1)
        m.batch_size.observe(n)
        m.users_scored.inc(n)
        m.probability.observe_many(probabilities)
        return probabilities
