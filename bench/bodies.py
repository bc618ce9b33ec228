"""The request bodies every phase sends: one user with 20 events, and 1,000 such users in a batch.

Deterministic (a seeded generator), inside the CDNOW model's 39-week lookback before ``as_of``, and
valid under the service's strict schema, so every request takes the full path: parse, validate,
encode, score.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

AS_OF = datetime(1997, 9, 30, tzinfo=UTC)
EVENTS_PER_USER = 20
BATCH_USERS = 1000
_LOOKBACK_DAYS = 270


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_user(index: int, rng: np.random.Generator, events: int = EVENTS_PER_USER) -> dict[str, Any]:
    days = np.sort(rng.integers(0, _LOOKBACK_DAYS, size=events))
    amounts = np.round(rng.gamma(2.0, 15.0, size=events), 2)
    quantities = rng.integers(1, 6, size=events)
    return {
        "user_id": f"bench-{index}",
        "as_of": _rfc3339(AS_OF),
        "events": [
            {
                "timestamp": _rfc3339(AS_OF - timedelta(days=int(_LOOKBACK_DAYS - d), hours=int(d % 24))),
                "amount": float(a),
                "quantity": int(q),
            }
            for d, a, q in zip(days, amounts, quantities, strict=True)
        ],
    }


def predict_body(events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """A ``/predict`` body: one user with ``events`` purchases."""
    return json.dumps(make_user(0, np.random.default_rng(seed), events)).encode()


def batch_body(users: int = BATCH_USERS, events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """A ``/predict/batch`` body: ``users`` users with ``events`` purchases each."""
    rng = np.random.default_rng(seed)
    return json.dumps({"users": [make_user(i, rng, events) for i in range(users)]}).encode()


def by_id_body(seed: int = 0) -> bytes:
    """A ``/predict`` body naming the user of :func:`predict_body` without events (read from the store)."""
    user = make_user(0, np.random.default_rng(seed))
    return json.dumps({"user_id": user["user_id"], "as_of": user["as_of"]}).encode()


def events_body(events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """A ``/events`` body storing the events of :func:`predict_body`'s user."""
    user = make_user(0, np.random.default_rng(seed), events)
    return json.dumps({"events": [{"user_id": user["user_id"], **e} for e in user["events"]]}).encode()
