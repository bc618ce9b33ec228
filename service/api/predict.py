"""``POST /predict``: one user's probability.

The app answers it with :func:`serve_predict`, a plain ASGI function called before FastAPI's
routing (``service.app.ServiceApp``); the route declared here documents it and, reached through
FastAPI, is answered by the same function. A small body is parsed and checked on the event loop,
then scored in the micro-batcher's next call (``service/batching.py``); a large one, a long
history, is parsed and scored in a worker thread. A user in a loaded canary's share is answered
by the canary (``service/rollout.py``), and the answer names it.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import numpy as np
import pydantic_core
from fastapi import APIRouter
from numpy.typing import NDArray
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from service.api.body import offload, parse_json, receive_body
from service.api.columns import (
    StoreReadNeeded,
    check_events,
    check_timestamps,
    resolve_columns,
    with_stored,
)
from service.api.deps import AppContext, check_scope, scoped
from service.api.openapi import PREDICT_ERRORS, add_direct_route, errors_doc, json_body
from service.auth import require_stored
from service.batching import Batcher, BatcherStoppedError, QueueFullError
from service.columns import EventColumns
from service.envelope import rejection
from service.errors import NotReadyError, OverloadedError, ServiceError
from service.lifecycle import LoadedModel
from service.rollout import route
from service.schemas import EXAMPLE_USER, PredictRequest, PredictResponse
from service.scopes import PREDICT, PREDICT_STORED

#: What lets a /predict request in: either scope; what the body asks for is checked once parsed.
BY_ID = frozenset({PREDICT_STORED})

router = APIRouter(tags=["predict"])


def _no_field(_: int) -> str:
    return ""  # a single user's fields are named from the top of the body: "events", "as_of"


def _parse_user(ctx: AppContext, body: bytes) -> PredictRequest:
    user = parse_json(PredictRequest, body)
    check_events([user], ctx.settings.max_events_per_user, lambda _: "events")
    return user


def _check_one(columns: EventColumns) -> None:
    check_timestamps(columns, lambda _, e: f"events[{e}].timestamp", lambda _: "as_of")


def _answer_one(served: LoadedModel, user_id: str, probability: float) -> bytes:
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


def _route(ctx: AppContext, served: LoadedModel, user_id: str) -> LoadedModel:
    """The canary for a user in its share (counted), else the model the request started with."""
    canary = route(ctx.slot, served, user_id)
    if canary is None:
        return served
    ctx.metrics.canary_users.inc()
    return canary


def _score_one(
    ctx: AppContext, served: LoadedModel, body: bytes, now: int, may_block: bool, *, state: dict[str, Any]
) -> bytes:
    user = _parse_user(ctx, body)
    served = _route(ctx, served, user.user_id)
    state["model_version"] = served.predictor.metadata.model_version  # the access log names the canary
    columns = resolve_columns(ctx, served, [user], now, _no_field, may_block=may_block)
    _check_one(columns)
    return _answer_one(served, user.user_id, float(ctx.scorer.score(served.predictor, columns)[0]))


async def submit_to_batcher(
    batcher: Batcher, served: LoadedModel, columns: EventColumns
) -> NDArray[np.float32]:
    try:
        return await batcher.submit(served, columns)
    except QueueFullError as exc:
        raise OverloadedError.retry_later(str(exc)) from None
    except BatcherStoppedError as exc:
        raise NotReadyError(str(exc)) from None


async def no_other_requests(ctx: AppContext) -> bool:
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
    """One user's answer. A user sent without events first has their history read together with
    other requests' (``HistoryReads``); the batcher is skipped when it is off or nobody else waits."""
    served, body, deadline = await receive_body(scope, receive, ctx)
    if len(body) > ctx.settings.inline_max_body_bytes:
        return await offload(ctx, partial(_score_one, state=scope["state"]), served, body, deadline)
    now = int(time.time())
    user = _parse_user(ctx, body)
    if ctx.slot.canary is not None:
        served = _route(ctx, served, user.user_id)
        scope["state"]["model_version"] = served.predictor.metadata.model_version  # the access log
    reads = ctx.history_reads
    if user.events is None and reads is not None:  # by user id: one store read per gathered batch
        require_stored()
        history = await reads.read(user.user_id)
        stored = {} if history is None else {user.user_id: history}
        columns = with_stored(ctx, served, [user], now, stored, _no_field)
    else:
        try:
            columns = resolve_columns(ctx, served, [user], now, _no_field, may_block=False)
        except StoreReadNeeded:  # no gathering reader: parse, read and score in a worker, alone
            return await offload(ctx, partial(_score_one, state=scope["state"]), served, body, deadline)
    _check_one(columns)
    if ctx.batcher is None or await no_other_requests(ctx):
        probabilities = ctx.scorer.score(served.predictor, columns)
    else:
        probabilities = await submit_to_batcher(ctx.batcher, served, columns)
    return _answer_one(served, user.user_id, float(probabilities[0]))


_JSON = (b"content-type", b"application/json")


async def serve_predict(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /predict`` as a plain ASGI app.

    FastAPI's routing, dependency and exception layers cost more on this path than validating
    the body (bench/README.md). What they did for this route is done here: errors become the one
    envelope through ``rejection``, and the body size, admission and request-id/metrics/log
    middleware wrap this app as they wrap FastAPI's.
    """
    ctx: AppContext = scope["state"]["context"]
    try:
        check_scope(ctx, scope, PREDICT, BY_ID)
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


add_direct_route(
    router,
    "/predict",
    serve_predict,
    name="predict",
    methods=["POST"],
    dependencies=[scoped(PREDICT, PREDICT_STORED)],  # for the route table; serve_predict checks it
    response_model=PredictResponse,
    responses=errors_doc(*PREDICT_ERRORS),
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
