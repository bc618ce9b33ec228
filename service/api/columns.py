"""Parsed prediction requests -> the encoder's columns: the request models stop at the API edge.

Users sent without ``events`` contribute no events here; their stored history is merged in by
:mod:`service.history`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from service.columns import EventColumns
from service.schemas import PredictRequest


def request_columns(users: Sequence[PredictRequest], now: int) -> EventColumns:
    """Flatten validated users into columns; ``now`` (epoch seconds) stands in for a missing ``as_of``.

    This is the one per-event Python loop left (reading attributes off validated objects); the
    encoder works on the columns with no per-event Python at all. Event timestamps are not
    range-checked here: call :func:`service.columns.out_of_range` on the result.
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


def _one_user(user: PredictRequest, now: int) -> EventColumns:
    """:func:`request_columns` for the single-user ``/predict``, without the flattening it does not need."""
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
