"""What the client sends and gets back, as plain dataclasses (no pydantic, no server code)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: An instant: an aware ``datetime``, an RFC 3339 string with an offset, or epoch seconds.
Instant = datetime | str | int | float


@dataclass(frozen=True)
class Event:
    """One purchase."""

    timestamp: Instant
    amount: float
    quantity: int


@dataclass(frozen=True)
class User:
    """A user to score: with ``events``, or ``None`` to use the history the store holds."""

    user_id: str
    events: Sequence[Event] | None = None
    as_of: Instant | None = None


@dataclass(frozen=True)
class StoredEvent:
    """A purchase for ``POST /events``; ``event_id`` (an order id) makes a retry store it once."""

    user_id: str
    timestamp: Instant
    amount: float
    quantity: int
    event_id: str | None = None


@dataclass(frozen=True)
class Columns:
    """Many users as columns: user ``i`` owns ``offsets[i]:offsets[i + 1]`` of the event lists.
    Timestamps may be epoch seconds (cheapest for the server) or RFC 3339 strings."""

    user_id: Sequence[str]
    offsets: Sequence[int]
    timestamp: Sequence[Instant]
    amount: Sequence[float]
    quantity: Sequence[int]
    as_of: Sequence[Instant | None] | None = None

    @classmethod
    def from_users(cls, users: Sequence[User]) -> Columns:
        """The columnar form of users that carry their events."""
        offsets = [0]
        timestamps: list[Instant] = []
        amounts: list[float] = []
        quantities: list[int] = []
        for user in users:
            if user.events is None:
                raise ValueError(f"user {user.user_id!r} has no events: columns carry events inline")
            for event in user.events:
                timestamps.append(event.timestamp)
                amounts.append(event.amount)
                quantities.append(event.quantity)
            offsets.append(len(timestamps))
        as_of = None if all(u.as_of is None for u in users) else [u.as_of for u in users]
        return cls([u.user_id for u in users], offsets, timestamps, amounts, quantities, as_of)


@dataclass(frozen=True)
class Prediction:
    """One user's answer."""

    user_id: str
    probability: float
    will_purchase: bool
    model_version: str = ""
    threshold: float = 0.0
    horizon_days: int = 0


@dataclass(frozen=True)
class Predictions:
    """A batch's answers in request order, rows or columns alike."""

    model_version: str
    threshold: float
    horizon_days: int
    user_id: list[str]
    probability: list[float]
    will_purchase: list[bool]

    def __len__(self) -> int:
        return len(self.user_id)

    def __iter__(self) -> Any:
        for user, p, w in zip(self.user_id, self.probability, self.will_purchase, strict=True):
            yield Prediction(user, p, w, self.model_version, self.threshold, self.horizon_days)


@dataclass(frozen=True)
class Stored:
    """What ``POST /events`` stored: every event is stored or a duplicate of one already there."""

    stored: int
    duplicates: int


@dataclass(frozen=True)
class Readiness:
    """``/readyz``: ``ready`` with the model version, or the reason it is not."""

    ready: bool
    status: str
    reason: str | None
    model_version: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ModelInfo:
    """``/v1/model``: the served model; ``raw`` holds everything else the server says."""

    model_version: str
    threshold: float
    horizon_days: int
    feature_spec: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Reloaded:
    """``POST /admin/reload``: the model now serving and the one it replaced."""

    model_version: str
    previous_version: str | None
    load_seconds: float
