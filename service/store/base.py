"""What every event store backend implements, and the values that cross it.

Events are keyed per user: ``(user_id, key)`` is unique, ``key`` being ``"id:" + event_id`` or,
for an event sent without an id, ``"sha:" + digest`` of its content, so a retried request stores
nothing twice either way. Identical events under distinct ids are all stored; the encoder and
compaction count them once (:mod:`service.cleaning`). Compaction folds whole days of raw events
older than a cut-off day into per-user counters (``service.columns.Folded``): exactly what
:func:`service.features.encode_batch` needs from events outside the window.

Beside the events, a backend keeps served predictions until their outcome is known
(:class:`OutcomeStore`, used by :mod:`service.outcomes`): one per model version, user and UTC day
of ``as_of`` (the first one recorded), and the latest event time it has seen, the clock that
decides when a prediction's horizon has passed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from service.columns import Folded

_ID_PREFIX = "id:"
_SHA_PREFIX = "sha:"


class StoreDownError(Exception):
    """The backend cannot be reached or refused the operation; nothing was acknowledged."""


def content_key(user_id: str, timestamp: int, amount: float, quantity: int) -> str:
    """The idempotency key of an event sent without an ``event_id``."""
    text = f"{user_id}\x00{timestamp}\x00{float(amount)!r}\x00{quantity}"
    return _SHA_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:32]


def event_key(user_id: str, event_id: str | None, timestamp: int, amount: float, quantity: int) -> str:
    if event_id is not None:
        return _ID_PREFIX + event_id
    return content_key(user_id, timestamp, amount, quantity)


def event_id_of(key: str) -> str | None:
    """The caller's ``event_id`` back from a key (``None`` for a content key)."""
    return key[len(_ID_PREFIX) :] if key.startswith(_ID_PREFIX) else None


@dataclass(frozen=True)
class NewEvent:
    user_id: str
    key: str  # see event_key
    timestamp: int  # epoch seconds, UTC
    amount: float
    quantity: int


@dataclass(frozen=True)
class StoredEvent:
    key: str
    timestamp: int
    amount: float
    quantity: int
    ingested_at: float  # unix time the store first acknowledged it


@dataclass(frozen=True)
class History:
    """A user's raw events (any order) and their folded counters, if any."""

    timestamps: list[int]
    amounts: list[float]
    quantities: list[int]
    folded: Folded | None


@dataclass(frozen=True)
class Appended:
    stored: int
    duplicates: int


@dataclass(frozen=True)
class Page:
    events: list[StoredEvent]  # ordered by (timestamp, key)
    total: int  # raw events stored for the user
    folded: Folded | None


@dataclass(frozen=True)
class Compacted:
    users: int
    events: int


#: ``Prediction.outcome`` values besides 1 (bought in the horizon) and 0 (did not).
UNOBSERVED = -1  # the store knows nothing of the user: "did not buy" cannot be told from "unknown"
COMPACTED = -2  # purchases that may lie in the horizon were folded into counters


class Prediction(NamedTuple):
    """A served prediction, kept until its outcome is known. Unique per ``(user_id, model_version,
    as_of day)``. A named tuple: one is made per recorded user, and a backend can bind it as is."""

    user_id: str
    model_version: str
    as_of: int  # epoch seconds
    horizon_days: int
    probability: float
    requested_at: float  # unix time it was served
    outcome: int | None = None  # None until settled: 1, 0, UNOBSERVED or COMPACTED

    @property
    def day(self) -> int:
        return self.as_of // 86_400

    @property
    def matures_at(self) -> int:
        """The end of the label window: a purchase up to this second counts."""
        return self.as_of + self.horizon_days * 86_400


@dataclass(frozen=True)
class Settled:
    """Settled predictions whose horizon ended in a window, by model version: probabilities and
    outcomes (0 / 1) side by side."""

    probabilities: dict[str, list[float]]
    outcomes: dict[str, list[int]]


@dataclass(frozen=True)
class Backlog:
    unsettled: int  # recorded, outcome not known yet
    overdue: int  # of those, horizons that ended before a given time (the wall clock, say)


class OutcomeStore(Protocol):
    """Blocking calls, like :class:`EventStore`'s; the same backends implement both."""

    def record(self, predictions: Sequence[Prediction]) -> Appended:
        """Keep the predictions not kept yet (by user, model version and day); count the rest."""
        ...

    def event_clock(self) -> int | None:
        """The latest event timestamp ever appended (epoch seconds), ``None`` before the first."""
        ...

    def due(self, matured_by: int, limit: int) -> list[Prediction]:
        """Unsettled predictions whose horizon ended at or before ``matured_by``, oldest first."""
        ...

    def settle(self, settled: Sequence[Prediction]) -> None:
        """Store the outcomes of ``settled`` and forget those whose outcome is unknown (they never
        count); predictions erased meanwhile stay erased."""
        ...

    def settled(self, matured_after: int, matured_by: int) -> Settled:
        """Settled predictions with a known outcome whose horizon ended in ``(after, by]``."""
        ...

    def backlog(self, overdue_by: int) -> Backlog: ...

    def prune(self, settled_before: int, recorded_before: float) -> int:
        """Forget settled predictions whose horizon ended before ``settled_before``, and any
        recorded before ``recorded_before`` (unix time); returns how many."""
        ...


class EventStore(OutcomeStore, Protocol):
    """Blocking calls: run them in a worker thread. Backend errors propagate as the backend's own
    exceptions; :class:`service.store.GuardedStore` turns them into :class:`StoreDownError`."""

    backend: str

    def append(self, events: Sequence[NewEvent], now: float) -> Appended:
        """Store the events not stored yet, in one durable transaction; count the rest as duplicates."""
        ...

    def histories(self, user_ids: Sequence[str]) -> dict[str, History]:
        """Every known user among ``user_ids`` (one query / one round trip); unknown ones are absent."""
        ...

    def page(self, user_id: str, offset: int, limit: int) -> Page | None:
        """A page of one user's raw events; ``None`` for an unknown user."""
        ...

    def erase(self, user_id: str) -> int:
        """Forget the user (raw events, folded counters, recorded predictions); returns the raw
        events deleted."""
        ...

    def compact(self, before_day: int, ingested_before: float) -> Compacted:
        """Fold events on days before ``before_day`` that were stored before ``ingested_before``."""
        ...

    def ping(self) -> None:
        """Raise if the backend cannot serve (also (re)opens a connection that was lost)."""
        ...

    def close(self) -> None: ...
