"""Events as flat columns: the one container that training and serving hand to the encoder.

User ``i`` owns ``[offsets[i], offsets[i + 1])`` of every event column, so many users are a few
numpy arrays rather than an object per event. Purchases compacted out of a stored history travel
beside them as counters: :class:`Folded` for one stored user, :class:`FoldedHistory` for a batch.
numpy only: the exporter, the event store and the request parsers all import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.timestamps import all_in_range, in_range


@dataclass(frozen=True)
class Folded:
    """One user's compacted purchases: counters over whole UTC days (epoch days)."""

    purchase_days: int
    first_day: int
    last_day: int
    total_amount: float
    total_quantity: float

    def merge(self, other: Folded) -> Folded:
        """Both folds together; days are assumed disjoint (see README, "Event store")."""
        return Folded(
            self.purchase_days + other.purchase_days,
            min(self.first_day, other.first_day),
            max(self.last_day, other.last_day),
            self.total_amount + other.total_amount,
            self.total_quantity + other.total_quantity,
        )


@dataclass(frozen=True)
class FoldedHistory:
    """Per-user counters of purchases that were folded out of a stored history (compaction).

    What the encoder needs from events older than the window, nothing else: distinct purchase
    days, the first and last purchase day (whole UTC days since the epoch), spend and quantity.
    Every folded purchase must lie outside the window of the ``as_of`` it is encoded at (the
    encoder refuses otherwise); then the features equal those of the full event history, as long
    as no folded day is also a day of the raw events (compaction folds whole days).
    """

    purchase_days: NDArray[np.int64]  # 0 for a user with nothing folded
    first_day: NDArray[np.int64]  # epoch days; ignored where purchase_days == 0
    last_day: NDArray[np.int64]
    total_amount: NDArray[np.float64]
    total_quantity: NDArray[np.float64]

    @classmethod
    def empty(cls, n_users: int) -> FoldedHistory:
        zeros = np.zeros(n_users, dtype=np.int64)
        return cls(zeros, zeros, zeros, np.zeros(n_users), np.zeros(n_users))

    @classmethod
    def from_rows(cls, rows: Sequence[Folded | None]) -> FoldedHistory | None:
        """One entry per user (``None``: nothing folded); ``None`` when no user has anything folded."""
        if all(row is None or not row.purchase_days for row in rows):
            return None
        present = [row if row is not None else _NOTHING_FOLDED for row in rows]
        return cls(
            np.array([f.purchase_days for f in present], dtype=np.int64),
            np.array([f.first_day for f in present], dtype=np.int64),
            np.array([f.last_day for f in present], dtype=np.int64),
            np.array([f.total_amount for f in present], dtype=np.float64),
            np.array([f.total_quantity for f in present], dtype=np.float64),
        )

    @classmethod
    def concat(cls, parts: Sequence[FoldedHistory]) -> FoldedHistory:
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in _FOLDED_FIELDS))


_NOTHING_FOLDED = Folded(0, 0, 0, 0.0, 0.0)
_FOLDED_FIELDS = tuple(f.name for f in dataclasses.fields(FoldedHistory))


@dataclass(frozen=True)
class EventColumns:
    """Many users' events as flat columns: user ``i`` owns ``[offsets[i], offsets[i + 1])``."""

    timestamps: NDArray[np.int64]  # epoch seconds, UTC
    amounts: NDArray[np.float64]
    quantities: NDArray[np.float64]
    offsets: NDArray[np.int64]  # [n_users + 1]
    as_of: NDArray[np.int64]  # [n_users], epoch seconds
    folded: FoldedHistory | None = None  # compacted counters of stored histories
    user_ids: Sequence[str] | None = None  # [n_users]: answers name them, outcomes are keyed by them

    @property
    def n_users(self) -> int:
        return int(self.offsets.size - 1)


def concat_columns(parts: Sequence[EventColumns]) -> EventColumns:
    """Several batches as one, users in the order given (the micro-batcher's join)."""
    if len(parts) == 1:
        return parts[0]
    counts = np.concatenate([np.diff(p.offsets) for p in parts])
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    folded = None
    if any(p.folded is not None for p in parts):  # stored histories that were compacted
        folded = FoldedHistory.concat(
            [p.folded if p.folded is not None else FoldedHistory.empty(p.n_users) for p in parts]
        )
    ids = [p.user_ids for p in parts]
    return EventColumns(
        timestamps=np.concatenate([p.timestamps for p in parts]),
        amounts=np.concatenate([p.amounts for p in parts]),
        quantities=np.concatenate([p.quantities for p in parts]),
        offsets=offsets,
        as_of=np.concatenate([p.as_of for p in parts]),
        folded=folded,
        user_ids=None if any(i is None for i in ids) else [u for i in ids if i is not None for u in i],
    )


_NONE = np.zeros(0, dtype=np.int64)
_NONE.flags.writeable = False


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
