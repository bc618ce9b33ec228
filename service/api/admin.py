"""``POST /admin/reload``: hot-swap the model, behind a bearer token (mounted only when one is set)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.body import check_content_type, parse_json
from service.api.deps import Context, scoped
from service.api.openapi import errors_doc, json_body
from service.errors import ModelRejectedError
from service.lifecycle import reload_model
from service.schemas import ReloadRequest, ReloadResponse
from service.scopes import ADMIN

router = APIRouter(tags=["admin"])


@router.post(
    "/admin/reload",
    dependencies=[scoped(ADMIN)],
    response_model=ReloadResponse,
    responses=errors_doc(
        400,
        401,
        413,
        415,
        (
            422,
            "A bad body (`invalid_input`), or the model file was refused (`model_rejected`: missing, "
            "unloadable, wrong signature or metadata, failed warm-up); the old model keeps serving.",
        ),
    ),
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
