"""``POST /events``: purchase events into the event store, acknowledged once durably stored.

Validation is the same as ``/predict``'s (each event is an :class:`service.schemas.Event` plus a
``user_id`` and an optional ``event_id``); the body is parsed and written in a store worker thread,
so a 10,000-event import does not stall the event loop. The answer counts the events stored and
those already there (a retry, or the same event twice in one request).
"""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from service.api.body import check_content_type, parse_json, read_body
from service.api.deps import AppContext, Context, in_store_thread, require_store, scoped
from service.api.openapi import errors_doc, json_body
from service.errors import too_many_events
from service.schemas import EVENT_TIMESTAMP_DESCRIPTION, Event, Timestamp
from service.scopes import INGEST
from service.store import NewEvent
from service.store.base import event_key

router = APIRouter(tags=["events"])

EXAMPLE_EVENTS: dict[str, Any] = {
    "events": [
        {
            "event_id": "order-88121",
            "user_id": "u-1042",
            "timestamp": "1997-06-20T00:00:00Z",
            "amount": 57.0,
            "quantity": 4,
        },
        {"user_id": "u-7", "timestamp": "1997-09-01T12:30:00+02:00", "amount": 12.5, "quantity": 1},
    ]
}


class IngestEvent(Event):
    """One purchase of one user, as ``/predict`` takes it, plus who bought and an optional id."""

    event_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Your id for the event (an order id); a retry with the same id per user is "
        "stored once. Without one, the event's content (user, second, amount, quantity) is its id.",
    )
    user_id: str = Field(min_length=1, max_length=256)
    # Range-checked here, per value: /predict checks its timestamps vectorised after flattening, but
    # what is stored must be valid on its own (an ingest is not latency-critical).
    timestamp: Timestamp = Field(description=EVENT_TIMESTAMP_DESCRIPTION)


class EventsRequest(BaseModel):
    """Events of any users, in any order; at most `PI_MAX_EVENTS_PER_USER` per request."""

    model_config = ConfigDict(
        strict=True, extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [EXAMPLE_EVENTS]}
    )

    events: list[IngestEvent] = Field(min_length=1, description="At least one event.")


class EventsResponse(BaseModel):
    """What the store now holds of the request: every event is either stored or a duplicate."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"stored": 2, "duplicates": 0}]})

    stored: int = Field(description="Events stored by this request.")
    duplicates: int = Field(description="Events already stored (same event id, or same content).")


def _ingest(ctx: AppContext, body: bytes) -> bytes:
    store, _ = require_store(ctx)
    events = parse_json(EventsRequest, body).events
    limit = ctx.settings.max_events_per_user
    if len(events) > limit:
        raise too_many_events(limit, ["events"])
    rows = []
    for e in events:
        ts = math.floor(e.timestamp.timestamp())  # what /predict does with an inline event
        rows.append(
            NewEvent(
                e.user_id,
                event_key(e.user_id, e.event_id, ts, e.amount, e.quantity),
                ts,
                e.amount,
                e.quantity,
            )
        )
    result = store.append(rows, time.time())
    return EventsResponse(stored=result.stored, duplicates=result.duplicates).model_dump_json().encode()


@router.post(
    "/events",
    dependencies=[scoped(INGEST)],
    response_model=EventsResponse,
    responses=errors_doc(
        400,
        408,
        413,
        415,
        (
            422,
            "An event breaks the same rules as in `/predict` (`invalid_input`), or more than "
            "`PI_MAX_EVENTS_PER_USER` events (`too_many_events`); nothing was stored.",
        ),
        (
            503,
            "The event store is down (`store_unavailable`) or the service is at its concurrency "
            "limit (`overloaded`): nothing was acknowledged, retry (it is idempotent).",
        ),
    ),
    openapi_extra=json_body(
        EventsRequest, {"two_events": {"summary": "Two purchases", "value": EXAMPLE_EVENTS}}
    ),
    summary="Store purchase events",
    description="Answers once every event is durably stored (or was already). Idempotent: a "
    "retried request stores nothing twice. `/predict` reads the stored history of a user sent "
    "without `events`.",
)
async def ingest(request: Request, ctx: Context) -> Response:
    check_content_type(request)
    body, _ = await read_body(request.receive, ctx)
    content = await in_store_thread(ctx, lambda: _ingest(ctx, body))
    return Response(content, media_type="application/json")
