"""``POST /predict`` and ``POST /predict/batch``.

A body is read as bytes and parsed and validated in one pass by pydantic's JSON parser: that is
what tells invalid JSON (400) from wrong fields (422), and why the OpenAPI bodies are declared by
hand. A body up to ``inline_max_body_bytes`` is handled on the event loop, where a thread hop
would cost more than the work; a larger one goes to the bounded thread pool so that it cannot
stall the loop. A small ``/predict`` is scored through the micro-batcher (``service/batching.py``).
The app serves ``/predict`` with :func:`serve_predict`, a plain ASGI function; the FastAPI route
below is what the OpenAPI document shows, and runs the same code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
import pydantic_core
from fastapi import APIRouter, Request
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.api.columns import StoreReadNeeded, resolve_columns, with_stored
from service.api.deps import AppContext, get_context, require_model
from service.batching import Batcher, BatcherStoppedError, QueueFullError
from service.bulk import (
    ARROW_MEDIA_TYPE,
    ARROW_PATHS,
    JSON_PATHS,
    ColumnarBatch,
    Paths,
    arrow_answer,
    check_columns,
    is_columnar_json,
    parse_arrow,
    parse_columnar_json,
    require_arrow,
)
from service.columns import EventColumns, out_of_range
from service.envelope import rejection
from service.errors import (
    ErrorDetail,
    InvalidInputError,
    NotReadyError,
    OverloadedError,
    RequestTimeoutError,
    ServiceError,
    UnsupportedMediaTypeError,
    from_validation_error,
    too_many_events,
    too_many_users,
)
from service.lifecycle import Served
from service.schemas import (
    EXAMPLE_COLUMNS,
    EXAMPLE_USER,
    BatchPredictRequest,
    BatchPredictResponse,
    ColumnarPredictions,
    ColumnarPredictRequest,
    ColumnarPredictResponse,
    ErrorResponse,
    Prediction,
    PredictRequest,
    PredictResponse,
)
from service.timestamps import EARLIEST, LATEST, RANGE_MESSAGE

router = APIRouter(tags=["predict"])

ModelT = TypeVar("ModelT", bound=BaseModel)
#: ``(context, model, body, now, may_block) -> answer``; ``may_block``: it runs in a worker thread.
Work = Callable[[AppContext, Served, bytes, int, bool], bytes]

_MAX_LISTED = 10  # users named in a too-many-events error; the count says the rest
_MAX_FIELDS = 100  # timestamps named in one out-of-range error

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "The body is not valid JSON (or not a readable Arrow stream).",
    },
    408: {"model": ErrorResponse, "description": "The body did not arrive within the request timeout."},
    413: {"model": ErrorResponse, "description": "The body is larger than `PI_MAX_BODY_BYTES`."},
    415: {"model": ErrorResponse, "description": "Content-Type is not application/json."},
    422: {
        "model": ErrorResponse,
        "description": "Wrong or missing fields, non-finite or negative numbers, timestamps that "
        f"do not parse, lack a UTC offset or lie outside {EARLIEST.year}..{LATEST.year}, too many "
        "events for a user; "
        "`history_compacted`: `as_of` before the stored history's retention horizon.",
    },
    404: {
        "model": ErrorResponse,
        "description": "A user sent without `events` has no stored history (`unknown_user`; "
        "with `PI_STORE_UNKNOWN_USER=empty` they are scored as a new user instead).",
    },
    503: {
        "model": ErrorResponse,
        "description": "No model is ready yet (`not_ready`), the service is at its concurrency "
        "limit (`overloaded`), or the event store is down (`store_unavailable`); retry after "
        "`Retry-After`.",
    },
}


def json_body(model: type[BaseModel], examples: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for ``model`` (its schema is added to components by the app)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
                    "examples": examples,
                }
            },
        }
    }


def _batch_body() -> dict[str, Any]:
    """``/predict/batch``: rows or columns as JSON, or an Arrow IPC stream."""
    extra = json_body(
        BatchPredictRequest,
        {
            "two_users": {
                "summary": "Two users, one inference call",
                "value": {
                    "users": [EXAMPLE_USER, {"user_id": "u-7", "events": [], "as_of": "1997-09-30T00:00:00Z"}]
                },
            },
            "columns": {
                "summary": "The same in columns (epoch seconds and RFC 3339 both accepted)",
                "value": EXAMPLE_COLUMNS,
            },
        },
    )
    content = extra["requestBody"]["content"]
    content["application/json"]["schema"] = {
        "oneOf": [
            {"$ref": f"#/components/schemas/{BatchPredictRequest.__name__}"},
            {"$ref": f"#/components/schemas/{ColumnarPredictRequest.__name__}"},
        ]
    }
    content[ARROW_MEDIA_TYPE] = {
        "schema": {
            "type": "string",
            "format": "binary",
            "description": "An Arrow IPC stream, one row per user: `user_id` (string), optional `as_of` "
            "(timestamp with a time zone, or epoch seconds; null = now), `events` (list of struct "
            "`timestamp`, `amount`, `quantity`). The answer is an Arrow stream too.",
        }
    }
    return extra


def check_content_type(request: Request) -> None:
    check_json(_media_type(request.scope))


def parse_json(model: type[ModelT], body: bytes) -> ModelT:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _check_events(users: Sequence[PredictRequest], limit: int, field: Callable[[int], str]) -> None:
    over = [i for i, user in enumerate(users) if len(user.events or ()) > limit]
    if over:
        raise too_many_events(limit, [field(i) for i in over[:_MAX_LISTED]], len(over))


def check_timestamps(
    columns: EventColumns, event_field: Callable[[int, int], str], as_of_field: Callable[[int], str]
) -> None:
    """The range rule (``service.timestamps``) for timestamps and ``as_of``, on the flat columns:
    the same 422 and field path (``events[3].timestamp``) a per-value pydantic validator gave,
    without a Python call each."""
    users, events, as_of = out_of_range(columns)
    if users.size or as_of.size:
        fields = [event_field(int(u), int(e)) for u, e in zip(users, events, strict=True)]
        fields += [as_of_field(int(u)) for u in as_of]
        raise InvalidInputError(
            "the request body does not match the schema",
            [ErrorDetail(field=f, type="value_error", message=RANGE_MESSAGE) for f in fields[:_MAX_FIELDS]],
        )


def _parse_user(ctx: AppContext, body: bytes) -> PredictRequest:
    user = parse_json(PredictRequest, body)
    _check_events([user], ctx.settings.max_events_per_user, lambda _: "events")
    return user


def _check_one(columns: EventColumns) -> None:
    check_timestamps(columns, lambda _, e: f"events[{e}].timestamp", lambda _: "as_of")


def _no_field(_: int) -> str:
    return ""  # a single user's fields are named from the top of the body: "events", "as_of"


def _parse_one(
    ctx: AppContext, served: Served, body: bytes, now: int, may_block: bool
) -> tuple[PredictRequest, EventColumns]:
    user = _parse_user(ctx, body)
    columns = resolve_columns(ctx, served, [user], now, _no_field, may_block=may_block)
    _check_one(columns)
    return user, columns


def _answer_one(served: Served, user_id: str, probability: float) -> bytes:
    """A :class:`PredictResponse` as JSON: pydantic-core's serializer on a plain dict writes the
    same bytes as the response model, for a fraction of the cost on the hottest path
    (tests/service/test_api.py checks the answer against the model)."""
    meta = served.predictor.metadata
    answer: bytes = pydantic_core.to_json(
        {
            "user_id": user_id,
            "probability": probability,
            "will_purchase": probability >= meta.threshold,
            "threshold": meta.threshold,
            "horizon_days": meta.horizon_days,
            "model_version": meta.model_version,
        }
    )
    return answer


def _score_one(ctx: AppContext, served: Served, body: bytes, now: int, may_block: bool) -> bytes:
    user, columns = _parse_one(ctx, served, body, now, may_block)
    return _answer_one(served, user.user_id, float(ctx.scorer.score(served.predictor, columns)[0]))


def _score_batch(ctx: AppContext, served: Served, body: bytes, now: int, may_block: bool) -> bytes:
    users = parse_json(BatchPredictRequest, body).users
    limit = ctx.settings.max_batch_users
    if len(users) > limit:
        raise too_many_users(limit, "users")
    _check_events(users, ctx.settings.max_events_per_user, lambda i: f"users[{i}].events")
    columns = resolve_columns(ctx, served, users, now, lambda i: f"users[{i}].", may_block=may_block)
    check_timestamps(columns, lambda u, e: f"users[{u}].events[{e}].timestamp", lambda u: f"users[{u}].as_of")
    probabilities = ctx.scorer.score(served.predictor, columns).tolist()
    meta = served.predictor.metadata
    threshold = meta.threshold
    return (
        BatchPredictResponse.model_construct(
            model_version=meta.model_version,
            threshold=threshold,
            horizon_days=meta.horizon_days,
            predictions=[
                Prediction.model_construct(user_id=u.user_id, probability=p, will_purchase=p >= threshold)
                for u, p in zip(users, probabilities, strict=True)
            ],
        )
        .model_dump_json()
        .encode()
    )


def _score_bulk(
    ctx: AppContext, served: Served, batch: ColumnarBatch, paths: Paths, now: int
) -> NDArray[np.float32]:
    settings = ctx.settings
    columns = check_columns(
        batch,
        now=now,
        max_users=settings.max_batch_users,
        max_events=settings.max_events_per_user,
        paths=paths,
    )
    return ctx.scorer.score(served.predictor, columns)


def _score_columnar(ctx: AppContext, served: Served, body: bytes, now: int, may_block: bool) -> bytes:
    batch = parse_columnar_json(body)
    probabilities = _score_bulk(ctx, served, batch, JSON_PATHS, now)
    meta = served.predictor.metadata
    return (
        ColumnarPredictResponse.model_construct(
            model_version=meta.model_version,
            threshold=meta.threshold,
            horizon_days=meta.horizon_days,
            columns=ColumnarPredictions.model_construct(
                user_id=batch.user_ids,
                probability=probabilities.tolist(),
                will_purchase=(probabilities.astype(np.float64) >= meta.threshold).tolist(),
            ),
        )
        .model_dump_json()
        .encode()
    )


def _score_arrow(ctx: AppContext, served: Served, body: bytes, now: int, may_block: bool) -> bytes:
    batch = parse_arrow(body, max_users=ctx.settings.max_batch_users)
    probabilities = _score_bulk(ctx, served, batch, ARROW_PATHS, now)
    meta = served.predictor.metadata
    return arrow_answer(
        batch.user_ids,
        probabilities,
        threshold=meta.threshold,
        horizon_days=meta.horizon_days,
        model_version=meta.model_version,
    )


def _score_json_batch(ctx: AppContext, served: Served, body: bytes, now: int, may_block: bool) -> bytes:
    if is_columnar_json(body):
        return _score_columnar(ctx, served, body, now, may_block)
    return _score_batch(ctx, served, body, now, may_block)


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


def _media_type(scope: Scope) -> str:
    return _header(scope, b"content-type").decode("latin-1").split(";", 1)[0].strip().lower()


def check_json(media_type: str) -> None:
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise UnsupportedMediaTypeError("send the body as JSON with Content-Type: application/json")


async def _read_body(receive: Receive) -> bytes:
    """The whole body; :class:`ClientDisconnect` if the client leaves first (nobody to answer)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _receive(
    scope: Scope, receive: Receive, ctx: AppContext, check: Callable[[str], None] = check_json
) -> tuple[Served, bytes, float]:
    """Content type, model, body: the model this request runs on and its body, read in time."""
    check(_media_type(scope))
    # The model this request runs on, taken once: a hot swap while it runs does not change it.
    served = require_model(ctx)
    # the version goes into the access log line, whatever happens next
    scope.setdefault("state", {})["model_version"] = served.predictor.metadata.model_version
    timeout = ctx.settings.request_timeout_seconds
    # the event loop's clock: anyio.current_time() reads the same clock but first looks up the
    # running async library, on every request
    deadline = asyncio.get_running_loop().time() + timeout
    # asyncio's timeout, not anyio.move_on_after: anyio's cancel scope is dearer, and grows with
    # the requests in flight; uvicorn always runs us on asyncio
    try:
        async with asyncio.timeout_at(deadline):
            body = await _read_body(receive)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout:g} s") from None
    return served, body, deadline


async def _offload(ctx: AppContext, work: Work, served: Served, body: bytes, deadline: float) -> bytes:
    """Run ``work`` in the bounded thread pool. Waiting for a worker counts against the deadline;
    the work itself, once started, runs to the end (a thread cannot be interrupted, and abandoning
    it would leak threads under overload)."""
    try:
        ctx.limiter.acquire_nowait()  # a free worker is taken even when the deadline has just passed
    except anyio.WouldBlock:
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0.0)) as queue:
            await ctx.limiter.acquire()
        if queue.cancelled_caught:
            timeout = ctx.settings.request_timeout_seconds
            raise OverloadedError.retry_later(f"no worker became free within {timeout:g} s") from None
    try:
        return await anyio.to_thread.run_sync(work, ctx, served, body, int(time.time()), True)
    finally:
        ctx.limiter.release()


async def _handle(
    request: Request,
    ctx: AppContext,
    work: Work,
    *,
    check: Callable[[str], None] = check_json,
    media_type: str = "application/json",
) -> Response:
    served, body, deadline = await _receive(request.scope, request.receive, ctx, check)
    if len(body) <= ctx.settings.inline_max_body_bytes:
        try:
            return Response(work(ctx, served, body, int(time.time()), False), media_type=media_type)
        except StoreReadNeeded:
            pass  # a user without inline events: the store is read in a worker thread, below
    return Response(await _offload(ctx, work, served, body, deadline), media_type=media_type)


async def _submit(batcher: Batcher, served: Served, columns: EventColumns) -> NDArray[np.float32]:
    try:
        return await batcher.submit(served, columns)
    except QueueFullError as exc:
        raise OverloadedError.retry_later(str(exc)) from None
    except BatcherStoppedError as exc:
        raise NotReadyError(str(exc)) from None


async def _alone(ctx: AppContext) -> bool:
    """No other prediction request is in progress: nobody to batch with, so skip the batcher's
    queue and its consumer task (two task switches). One turn of the loop first: requests whose
    bytes arrived together start in that turn and count as in progress, so a burst is batched.
    An empty batch queue would be no such test: handlers that become ready in one turn of the
    loop each find it empty in turn."""
    if ctx.admission is None or ctx.admission.active > 1:  # under load: no turn of the loop spent
        return False
    await asyncio.sleep(0)
    return ctx.admission.active <= 1


async def _predict(scope: Scope, receive: Receive, ctx: AppContext) -> bytes:
    """One user's answer. A small body is parsed and validated on the loop, then scored in the
    micro-batcher's next call (or right here when it is off or the request is alone); a user sent
    without events first has their history read together with other requests' (HistoryReads). A
    body over ``inline_max_body_bytes`` (a long history) is parsed and scored in a worker thread."""
    served, body, deadline = await _receive(scope, receive, ctx)
    if len(body) <= ctx.settings.inline_max_body_bytes:
        now = int(time.time())
        user = _parse_user(ctx, body)
        reads = ctx.history_reads
        if user.events is None and reads is not None:  # by user id: one store read per gathered batch
            history = await reads.read(user.user_id)
            stored = {} if history is None else {user.user_id: history}
            columns = with_stored(ctx, served, [user], now, stored, _no_field)
        else:
            try:
                columns = resolve_columns(ctx, served, [user], now, _no_field, may_block=False)
            except StoreReadNeeded:  # no gathering reader: parse, read and score in a worker, alone
                return await _offload(ctx, _score_one, served, body, deadline)
        _check_one(columns)
        if ctx.batcher is None or await _alone(ctx):
            probabilities = ctx.scorer.score(served.predictor, columns)
        else:
            probabilities = await _submit(ctx.batcher, served, columns)
        return _answer_one(served, user.user_id, float(probabilities[0]))
    return await _offload(ctx, _score_one, served, body, deadline)


_JSON = (b"content-type", b"application/json")


async def serve_predict(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /predict`` as a plain ASGI app, the route the app calls directly (``service.app``).

    FastAPI's routing, dependency and exception layers cost more on this path than validating
    the body (bench/README.md). What they did for this route is done here: errors become the one
    envelope through the exception handler's own ``rejection``, and the body size, admission and
    request-id/metrics/log middleware wrap this app as they wrap FastAPI's.
    """
    ctx: AppContext = scope["state"]["context"]
    try:
        answer = await _predict(scope, receive, ctx)
    except ServiceError as exc:
        await rejection(exc, ctx.metrics)(scope, receive, send)
        return
    except ClientDisconnect:
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [_JSON, (b"content-length", b"%d" % len(answer))],
        }
    )
    await send({"type": "http.response.body", "body": answer})


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=json_body(
        PredictRequest,
        {
            "a_customer": {"summary": "Three purchases, scored at a fixed date", "value": EXAMPLE_USER},
            "no_history": {
                "summary": "No purchases yet, scored now",
                "value": {"user_id": "u-new", "events": []},
            },
        },
    ),
    summary="Score one user",
    description="How likely is this user to buy at least once within the model's horizon after "
    "`as_of`? Events after `as_of` are ignored. Timestamps must be RFC 3339 with a UTC offset.",
)
async def predict(request: Request) -> Response:
    # What the OpenAPI document shows; the app serves this route with serve_predict (same code).
    ctx = await get_context(request)  # not Depends(): FastAPI's dependency solver is dear per call
    return Response(await _predict(request.scope, request.receive, ctx), media_type="application/json")


@router.post(
    "/predict/batch",
    response_model=BatchPredictResponse | ColumnarPredictResponse,
    responses={
        **_ERRORS,
        200: {
            "description": "Rows for rows, columns for columns, an Arrow stream (`user_id`, "
            "`probability` float32, `will_purchase`; version, threshold and horizon in the schema "
            "metadata) for an Arrow stream.",
            "content": {ARROW_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        415: {
            "model": ErrorResponse,
            "description": "Content-Type is neither JSON nor an Arrow stream, or an Arrow stream "
            "reached a server without pyarrow (the `arrow` extra).",
        },
        413: {
            "model": ErrorResponse,
            "description": "More users than `PI_MAX_BATCH_USERS`, or a body over `PI_MAX_BODY_BYTES`.",
        },
    },
    openapi_extra=_batch_body(),
    summary="Score many users in one inference call",
    description="Same per-user objects as `/predict`; predictions come back in request order. "
    "Duplicate user ids are scored independently (e.g. one user at several `as_of`). The same users "
    'can be sent as columns (`{"columns": {...}}`, answered in columns) or as an Arrow IPC stream '
    "(`Content-Type: application/vnd.apache.arrow.stream`, answered as one), both much cheaper to "
    "parse than one JSON object per event.",
)
async def predict_batch(request: Request) -> Response:
    ctx = await get_context(request)
    if _media_type(request.scope) == ARROW_MEDIA_TYPE:
        return await _handle(
            request, ctx, _score_arrow, check=lambda _: require_arrow(), media_type=ARROW_MEDIA_TYPE
        )
    return await _handle(request, ctx, _score_json_batch)
