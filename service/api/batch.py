"""``POST /predict/batch``: many users in one inference call, as rows, columns or an Arrow stream.

Each format is answered in kind: rows for rows, columns for columns (``service/bulk.py`` parses
those and Arrow straight into numpy columns), an Arrow stream for an Arrow stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.body import media_type_of, parse_json, respond
from service.api.columns import check_events, check_timestamps, resolve_columns
from service.api.deps import AppContext, get_context, scoped
from service.api.openapi import PREDICT_ERRORS, batch_body, errors_doc
from service.bulk import (
    ARROW_MEDIA_TYPE,
    arrow_answer,
    columns_from_arrow,
    columns_from_json,
    is_columnar_json,
    require_arrow,
)
from service.errors import too_many_users
from service.lifecycle import LoadedModel
from service.schemas import (
    BatchPredictRequest,
    BatchPredictResponse,
    ColumnarPredictions,
    ColumnarPredictResponse,
    Prediction,
)
from service.scopes import PREDICT

router = APIRouter(tags=["predict"])


def _score_rows(ctx: AppContext, served: LoadedModel, body: bytes, now: int, may_block: bool) -> bytes:
    users = parse_json(BatchPredictRequest, body).users
    limit = ctx.settings.max_batch_users
    if len(users) > limit:
        raise too_many_users(limit, "users")
    check_events(users, ctx.settings.max_events_per_user, lambda i: f"users[{i}].events")
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


def _score_columns(ctx: AppContext, served: LoadedModel, body: bytes, now: int, may_block: bool) -> bytes:
    settings = ctx.settings
    columns = columns_from_json(
        body, now=now, max_users=settings.max_batch_users, max_events=settings.max_events_per_user
    )
    probabilities = ctx.scorer.score(served.predictor, columns)
    meta = served.predictor.metadata
    return (
        ColumnarPredictResponse.model_construct(
            model_version=meta.model_version,
            threshold=meta.threshold,
            horizon_days=meta.horizon_days,
            columns=ColumnarPredictions.model_construct(
                user_id=columns.user_ids,
                probability=probabilities.tolist(),
                will_purchase=(probabilities.astype(np.float64) >= meta.threshold).tolist(),
            ),
        )
        .model_dump_json()
        .encode()
    )


def _score_json(ctx: AppContext, served: LoadedModel, body: bytes, now: int, may_block: bool) -> bytes:
    if is_columnar_json(body):
        return _score_columns(ctx, served, body, now, may_block)
    return _score_rows(ctx, served, body, now, may_block)


def _score_arrow(ctx: AppContext, served: LoadedModel, body: bytes, now: int, may_block: bool) -> bytes:
    settings = ctx.settings
    columns = columns_from_arrow(
        body, now=now, max_users=settings.max_batch_users, max_events=settings.max_events_per_user
    )
    assert columns.user_ids is not None  # a bulk body names its users
    probabilities = ctx.scorer.score(served.predictor, columns)
    meta = served.predictor.metadata
    return arrow_answer(
        columns.user_ids,
        probabilities,
        threshold=meta.threshold,
        horizon_days=meta.horizon_days,
        model_version=meta.model_version,
    )


_ARROW_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Rows for rows, columns for columns, an Arrow stream (`user_id`, "
        "`probability` float32, `will_purchase`; version, threshold and horizon in the schema "
        "metadata) for an Arrow stream.",
        "content": {ARROW_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/predict/batch",
    dependencies=[scoped(PREDICT)],
    response_model=BatchPredictResponse | ColumnarPredictResponse,
    responses=errors_doc(*PREDICT_ERRORS)
    | _ARROW_ANSWER
    | errors_doc(
        (
            415,
            "Content-Type is neither JSON nor an Arrow stream, or an Arrow stream reached a server "
            "without pyarrow (the `arrow` extra).",
        ),
        (413, "More users than `PI_MAX_BATCH_USERS`, or a body over `PI_MAX_BODY_BYTES`."),
    ),
    openapi_extra=batch_body(),
    summary="Score many users in one inference call",
    description="Same per-user objects as `/predict`; predictions come back in request order. "
    "Duplicate user ids are scored independently (e.g. one user at several `as_of`). The same users "
    'can be sent as columns (`{"columns": {...}}`, answered in columns) or as an Arrow IPC stream '
    "(`Content-Type: application/vnd.apache.arrow.stream`, answered as one), both much cheaper to "
    "parse than one JSON object per event.",
)
async def predict_batch(request: Request) -> Response:
    ctx = await get_context(request)  # not Depends(): FastAPI's dependency solver is dear per call
    if media_type_of(request.scope) == ARROW_MEDIA_TYPE:
        return await respond(
            request, ctx, _score_arrow, check=lambda _: require_arrow(), media_type=ARROW_MEDIA_TYPE
        )
    return await respond(request, ctx, _score_json)
