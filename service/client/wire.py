"""Requests built and answers read, shared by the sync and async clients; and the retry policy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.client.models import (
    Columns,
    Event,
    Instant,
    ModelInfo,
    Prediction,
    Predictions,
    Readiness,
    Reloaded,
    Stored,
    StoredEvent,
    User,
)

JSON = "application/json"
ARROW = "application/vnd.apache.arrow.stream"


@dataclass(frozen=True)
class Retry:
    """How a 503 (not ready, overloaded, store down) is retried: ``attempts`` tries in all, each wait
    the server's ``Retry-After`` or ``backoff_s * 2**n``, whichever is longer, capped at
    ``max_wait_s``. Only 503s are retried: the service sends them before doing any of the work,
    so even ``POST /events`` is safe to send again (and it is idempotent besides)."""

    attempts: int = 4
    backoff_s: float = 0.05
    max_wait_s: float = 10.0

    def wait(self, attempt: int, retry_after: float | None) -> float:
        return min(self.max_wait_s, max(retry_after or 0.0, self.backoff_s * 2.0**attempt))


NO_RETRY = Retry(attempts=1)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    content: bytes | None = None
    content_type: str | None = None


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def rfc3339(value: Instant) -> str:
    """The rows format takes RFC 3339 with an offset only: epoch seconds and datetimes converted."""
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("a datetime needs a time zone (the service refuses naive instants)")
        return value.isoformat()
    return datetime.fromtimestamp(value, tz=UTC).isoformat()


def _columnar(value: Instant) -> str | int | float:
    return value.isoformat() if isinstance(value, datetime) else value


def _event(event: Event) -> dict[str, Any]:
    return {"timestamp": rfc3339(event.timestamp), "amount": event.amount, "quantity": event.quantity}


def _user(user: User) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": user.user_id}
    if user.events is not None:
        body["events"] = [_event(e) for e in user.events]
    if user.as_of is not None:
        body["as_of"] = rfc3339(user.as_of)
    return body


def predict_call(user: User) -> Call:
    return Call("POST", "/predict", _dumps(_user(user)), JSON)


def batch_call(users: Sequence[User]) -> Call:
    return Call("POST", "/predict/batch", _dumps({"users": [_user(u) for u in users]}), JSON)


def columns_call(columns: Columns) -> Call:
    body: dict[str, Any] = {
        "user_id": list(columns.user_id),
        "offsets": list(columns.offsets),
        "timestamp": [_columnar(t) for t in columns.timestamp],
        "amount": list(columns.amount),
        "quantity": list(columns.quantity),
    }
    if columns.as_of is not None:
        body["as_of"] = [None if t is None else _columnar(t) for t in columns.as_of]
    return Call("POST", "/predict/batch", _dumps({"columns": body}), JSON)


def arrow_call(stream: bytes) -> Call:
    return Call("POST", "/predict/batch", stream, ARROW)


def events_call(events: Sequence[StoredEvent]) -> Call:
    rows = []
    for e in events:
        row: dict[str, Any] = {
            "user_id": e.user_id,
            "timestamp": rfc3339(e.timestamp),
            "amount": e.amount,
            "quantity": e.quantity,
        }
        if e.event_id is not None:
            row["event_id"] = e.event_id
        rows.append(row)
    return Call("POST", "/events", _dumps({"events": rows}), JSON)


def reload_call(model_path: str | None) -> Call:
    body = {} if model_path is None else {"model_path": model_path}
    return Call("POST", "/admin/reload", _dumps(body), JSON)


def read_reloaded(body: dict[str, Any]) -> Reloaded:
    return Reloaded(body["model_version"], body.get("previous_version"), body["load_seconds"])


def read_prediction(body: dict[str, Any]) -> Prediction:
    return Prediction(
        user_id=body["user_id"],
        probability=body["probability"],
        will_purchase=body["will_purchase"],
        model_version=body["model_version"],
        threshold=body["threshold"],
        horizon_days=body["horizon_days"],
    )


def read_predictions(body: dict[str, Any]) -> Predictions:
    """Rows (``predictions``) or columns (``columns``), as one type."""
    if "columns" in body:
        c = body["columns"]
        ids, probabilities, flags = c["user_id"], c["probability"], c["will_purchase"]
    else:
        rows = body["predictions"]
        ids = [r["user_id"] for r in rows]
        probabilities = [r["probability"] for r in rows]
        flags = [r["will_purchase"] for r in rows]
    return Predictions(
        body["model_version"], body["threshold"], body["horizon_days"], ids, probabilities, flags
    )


def read_stored(body: dict[str, Any]) -> Stored:
    return Stored(stored=body["stored"], duplicates=body["duplicates"])


def read_readiness(body: dict[str, Any]) -> Readiness:
    return Readiness(
        ready=bool(body.get("ready")),
        status=str(body.get("status", "")),
        reason=body.get("reason"),
        model_version=body.get("model_version"),
        raw=body,
    )


def read_model(body: dict[str, Any]) -> ModelInfo:
    return ModelInfo(
        model_version=body["model_version"],
        threshold=body["threshold"],
        horizon_days=body["horizon_days"],
        feature_spec=body["feature_spec"],
        raw=body,
    )
