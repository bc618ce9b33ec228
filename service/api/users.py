"""``GET /users/{user_id}/events`` and ``DELETE /users/{user_id}``: a user's stored history, behind
the admin token (mounted only when ``PI_ADMIN_TOKEN`` is set and an event store is configured).

Erasure removes the raw events and the folded counters in one transaction; afterwards the user is
unknown (``/predict`` without events answers ``unknown_user``, or cold-starts them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.api.deps import Context, in_store_thread, require_store, scoped
from service.api.openapi import errors_doc
from service.columns import Folded
from service.errors import ErrorDetail, UnknownUserError
from service.features import SECONDS_PER_DAY
from service.scopes import USERS_DELETE, USERS_READ
from service.store import StoredEvent, event_id_of


class _AnyText(Convertor[str]):
    """A path parameter of any characters: Starlette's ``path`` (``.*``) stops at a newline, and a
    user id with one (``%0A`` in the URL) could be stored but never read or erased."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("text", _AnyText())  # before the routes below compile their paths

router = APIRouter(tags=["admin"])

UserId = Annotated[str, Path(min_length=1, max_length=256, description="Percent-encode it in the URL.")]

_ERRORS = (
    401,
    (422, "A bad user id or query parameter."),
    (503, "The event store is down (`store_unavailable`)."),
)


class StoredEventOut(BaseModel):
    event_id: str | None = Field(description="The id it was sent with; null when it had none.")
    timestamp: str = Field(description="RFC 3339, UTC, whole seconds.")
    amount: float
    quantity: int
    ingested_at: str = Field(description="When the store first acknowledged it, RFC 3339.")


class FoldedOut(BaseModel):
    """Purchases compacted out of the raw history, as the counters the model needs."""

    purchase_days: int = Field(description="Distinct UTC days with a purchase.")
    first_purchase_day: str = Field(description="YYYY-MM-DD, UTC.")
    last_purchase_day: str
    total_amount: float
    total_quantity: float


class UserEventsPage(BaseModel):
    user_id: str
    total: int = Field(description="Raw events stored for the user.")
    offset: int
    limit: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last one.")
    events: list[StoredEventOut] = Field(description="Ordered by timestamp.")
    folded: FoldedOut | None = Field(description="Compacted older purchases; null when none.")


class ErasureResponse(BaseModel):
    user_id: str
    deleted_events: int = Field(
        description="Raw events deleted (0 for an unknown user); folded counters go too."
    )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _day(epoch_day: int) -> str:
    return datetime.fromtimestamp(epoch_day * SECONDS_PER_DAY, UTC).date().isoformat()


def _event(e: StoredEvent) -> StoredEventOut:
    return StoredEventOut(
        event_id=event_id_of(e.key),
        timestamp=_iso(e.timestamp),
        amount=e.amount,
        quantity=e.quantity,
        ingested_at=_iso(e.ingested_at),
    )


def _folded(f: Folded) -> FoldedOut:
    return FoldedOut(
        purchase_days=f.purchase_days,
        first_purchase_day=_day(f.first_day),
        last_purchase_day=_day(f.last_day),
        total_amount=f.total_amount,
        total_quantity=f.total_quantity,
    )


@router.get(
    "/users/{user_id:text}/events",
    dependencies=[scoped(USERS_READ)],
    response_model=UserEventsPage,
    responses=errors_doc(*_ERRORS, (404, "No stored history (`unknown_user`).")),
    openapi_extra={"security": [{"bearer": []}]},
    summary="A user's stored events, paged",
)
async def user_events(
    request: Request,
    ctx: Context,
    user_id: UserId,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    store, _ = require_store(ctx)
    page = await in_store_thread(ctx, lambda: store.page(user_id, offset, limit))
    if page is None:
        raise UnknownUserError(
            "no stored history for this user",
            [ErrorDetail(field="user_id", type="unknown_user", message="no stored history")],
        )
    end = offset + len(page.events)
    body = UserEventsPage(
        user_id=user_id,
        total=page.total,
        offset=offset,
        limit=limit,
        next_offset=end if end < page.total else None,
        events=[_event(e) for e in page.events],
        folded=_folded(page.folded) if page.folded is not None else None,
    )
    return Response(body.model_dump_json(), media_type="application/json")


@router.delete(
    "/users/{user_id:text}",
    dependencies=[scoped(USERS_DELETE)],
    response_model=ErasureResponse,
    responses=errors_doc(*_ERRORS),
    openapi_extra={"security": [{"bearer": []}]},
    summary="Forget a user (erasure)",
    description="Deletes the user's raw events, compacted counters and recorded predictions, and "
    "answers once no file of the store holds them any more (SQLite: secure delete and a WAL "
    "checkpoint; Redis: an append-only-file rewrite and, if snapshots are configured, a snapshot). "
    "Idempotent: erasing an unknown user answers 200 with `deleted_events: 0`.",
)
async def erase_user(request: Request, ctx: Context, user_id: UserId) -> Response:
    if user_id.endswith("/events") and request.scope.get("raw_path", b"").endswith(b"/events"):
        # `/users/u-7/events` sent as is names the events listing, which has no DELETE; a user id
        # that ends in "/events" is erased with its "/" percent-encoded, as for any id
        raise HTTPException(405, headers={"Allow": "GET"})
    store, _ = require_store(ctx)
    monitor = ctx.monitor
    erase = (lambda: monitor.erase(store, user_id)) if monitor is not None else (lambda: store.erase(user_id))
    if ctx.cluster is not None and monitor is not None and monitor.recorder is not None:
        # The other workers' buffers first: what they drained and wrote before this goes with the
        # delete below. One that does not answer fails the erasure (503, retry) before it starts.
        for answer in (await ctx.cluster.call_others({"op": "forget", "user_id": user_id})).values():
            if isinstance(answer, BaseException):
                raise answer
    deleted = await in_store_thread(ctx, erase)
    body = ErasureResponse(user_id=user_id, deleted_events=deleted)
    return Response(body.model_dump_json(), media_type="application/json")
