"""``POST /admin/reload``: hot-swap the model, behind a bearer token (mounted only when one is set)."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import AppContext, Context
from service.api.predict import check_content_type, json_body, parse_json
from service.errors import ModelRejectedError, UnauthorizedError
from service.lifecycle import reload_model
from service.schemas import ErrorResponse, ReloadRequest, ReloadResponse

router = APIRouter(tags=["admin"])


def authorise(request: Request, ctx: AppContext) -> None:
    expected = ctx.settings.admin_token
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guessed token was right
    if (
        expected is None
        or scheme.lower() != "bearer"
        or not secrets.compare_digest(token.strip().encode(), expected.get_secret_value().encode())
    ):
        raise UnauthorizedError(
            "a valid admin token is required: Authorization: Bearer <PI_ADMIN_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={
        400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
        401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
        413: {"model": ErrorResponse, "description": "The body is larger than `PI_MAX_BODY_BYTES`."},
        415: {"model": ErrorResponse, "description": "Content-Type is not application/json."},
        422: {
            "model": ErrorResponse,
            "description": "A bad body (`invalid_input`), or the model file was refused "
            "(`model_rejected`: missing, unloadable, wrong signature or metadata, failed warm-up); "
            "the old model keeps serving.",
        },
    },
    openapi_extra={
        "requestBody": {
            **json_body(ReloadRequest, {"configured": {"summary": "Reload PI_MODEL_PATH", "value": {}}})[
                "requestBody"
            ],
            "required": False,  # no body reloads the configured model file, as `{}` does
        },
        "security": [{"bearer": []}],
    },
    summary="Hot-swap the model",
    description="Loads the file in a worker thread, checks its metadata and input/output "
    "signature, runs a warm-up inference at every batch size, then swaps it in atomically. "
    "Requests in flight finish on the old model; every response names the version that served "
    "it. A file that fails any step is refused and the old model keeps serving.",
)
async def reload(request: Request, ctx: Context) -> Response:
    authorise(request, ctx)
    body = await request.body()
    target = ReloadRequest()
    if body:  # none at all; anything else is JSON, as on every route
        check_content_type(request)
        target = parse_json(ReloadRequest, body)
    path = Path(target.model_path) if target.model_path is not None else ctx.settings.model_path
    if path is None:
        raise ModelRejectedError("no model_path given and no PI_MODEL_PATH configured")
    result = await reload_model(ctx.slot, ctx.settings, ctx.metrics, path, lock=ctx.reload_lock)
    request.state.model_version = result.served.predictor.metadata.model_version
    answer = ReloadResponse(
        model_version=result.served.predictor.metadata.model_version,
        previous_version=result.previous_version,
        load_seconds=result.served.load_seconds,
    )
    return Response(answer.model_dump_json(), media_type="application/json")
