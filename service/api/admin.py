"""The admin routes, behind a bearer token (mounted only when one is set): ``POST /admin/reload``
hot-swaps the served model; ``/admin/models/{shadow,canary}`` load, promote and unload the models
beside it (``service/rollout.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from service.api.body import ModelT, check_content_type, parse_json
from service.api.deps import Context, scoped
from service.api.openapi import errors_doc, json_body
from service.errors import ModelRejectedError
from service.lifecycle import Role
from service.rollout import Change, Placed, Planned, apply
from service.schemas import (
    CanaryRequest,
    PlacedResponse,
    ReloadRequest,
    ReloadResponse,
    ShadowRequest,
    UnloadResponse,
)
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
    result = await _apply(ctx, Change("reload", path=str(path)))
    assert result.placed is not None
    served = result.placed.served
    request.state.model_version = served.predictor.metadata.model_version
    answer = ReloadResponse(
        model_version=served.predictor.metadata.model_version,
        previous_version=result.placed.previous_version,
        load_seconds=served.load_seconds,
    )
    return Response(answer.model_dump_json(), media_type="application/json")


_ROLE_ERRORS = errors_doc(
    400,
    401,
    413,
    415,
    (
        422,
        "A bad body (`invalid_input`: `sample` outside 0..1, `percent` outside 0..100, unknown "
        "fields), or the model file was refused (`model_rejected`: missing, unloadable, wrong "
        "signature, metadata or feature spec, failed warm-up, another horizon than the served "
        "model's, or a version already loaded); nothing that serves changes.",
    ),
    (503, "No model is being served yet to load one beside (`not_ready`)."),
)


async def _apply(ctx: Context, change: Change) -> Planned:
    return await apply(
        ctx.slot, ctx.settings, ctx.metrics, change, lock=ctx.reload_lock, coordinator=ctx.coordinator
    )


def _path(given: str | None, configured: Path | None, setting: str) -> Path:
    if given is not None:
        return Path(given)
    if configured is None:
        raise ModelRejectedError(f"no model_path given and no {setting} configured")
    return configured


async def _body(request: Request, model: type[ModelT]) -> ModelT:
    body = await request.body()
    if not body:
        return model()
    check_content_type(request)
    return parse_json(model, body)


def _placed(role: Role, placed: Placed) -> Response:
    meta = placed.served.predictor.metadata
    answer = PlacedResponse(
        role=role,
        model_version=meta.model_version,
        previous_version=placed.previous_version,
        load_seconds=placed.served.load_seconds,
    )
    return Response(answer.model_dump_json(), media_type="application/json")


def _side_body(model: type[BaseModel], summary: str, value: dict[str, object]) -> dict[str, Any]:
    return {
        "requestBody": {
            **json_body(model, {"example": {"summary": summary, "value": value}})["requestBody"],
            "required": False,
        },
        "security": [{"bearer": []}],
    }


@router.put(
    "/admin/models/shadow",
    dependencies=[scoped(ADMIN)],
    response_model=PlacedResponse,
    responses=_ROLE_ERRORS,
    openapi_extra=_side_body(
        ShadowRequest, "Shadow 10 % of calls", {"model_path": "next.onnx", "sample": 0.1}
    ),
    summary="Load a shadow model",
    description="Loads, checks and warms up the file like a hot swap, then scores `sample` of the "
    "served model's scoring calls with it too, on a thread of its own after the answers are sent: "
    "answers never change. Its score difference from the served model, its drift and its live "
    "quality are exported under its version. Replaces any shadow. Only a `sample` and a shadow "
    "loaded: the same model, another sample (nothing is loaded).",
)
async def put_shadow(request: Request, ctx: Context) -> Response:
    target = await _body(request, ShadowRequest)
    s = ctx.settings
    sample = s.shadow_sample if target.sample is None else target.sample
    if target.model_path is None and target.sample is not None:
        kept = await _apply(ctx, Change("reshare", "shadow", share=sample))
        if kept.placed is not None:
            return _placed("shadow", kept.placed)
    path = _path(target.model_path, s.shadow_model, "PI_SHADOW_MODEL")
    placed = await _apply(ctx, Change("place", "shadow", str(path), sample))
    assert placed.placed is not None
    return _placed("shadow", placed.placed)


@router.put(
    "/admin/models/canary",
    dependencies=[scoped(ADMIN)],
    response_model=PlacedResponse,
    responses=_ROLE_ERRORS,
    openapi_extra=_side_body(
        CanaryRequest, "Canary for 5 % of users", {"model_path": "next.onnx", "percent": 5}
    ),
    summary="Load a canary model",
    description="Loads, checks and warms up the file like a hot swap, then answers `percent` of "
    "users with it on `/predict`, chosen by a hash of `user_id`: a user stays on one model across "
    "requests, replicas and restarts, and raising the percent only adds users. Each answer's "
    "`model_version` names the model that produced it. Replaces any canary. Only a `percent` and "
    "a canary loaded: the same model, another share (nothing is loaded). Batch requests are "
    "answered by the served model.",
)
async def put_canary(request: Request, ctx: Context) -> Response:
    target = await _body(request, CanaryRequest)
    s = ctx.settings
    percent = s.canary_percent if target.percent is None else target.percent
    if target.model_path is None and target.percent is not None:
        kept = await _apply(ctx, Change("reshare", "canary", share=percent))
        if kept.placed is not None:
            return _placed("canary", kept.placed)
    path = _path(target.model_path, s.canary_model, "PI_CANARY_MODEL")
    placed = await _apply(ctx, Change("place", "canary", str(path), percent))
    assert placed.placed is not None
    return _placed("canary", placed.placed)


@router.post(
    "/admin/models/canary/promote",
    dependencies=[scoped(ADMIN)],
    response_model=PlacedResponse,
    responses=errors_doc(401, (409, "No canary is loaded (`no_canary`).")),
    openapi_extra={"security": [{"bearer": []}]},
    summary="Promote the canary",
    description="The canary becomes the served model for everyone, in one step: no request fails "
    "or finds no model, requests in flight finish on the model they started with. There is no "
    "canary afterwards. (A rollback is `DELETE /admin/models/canary`.)",
)
async def promote(request: Request, ctx: Context) -> Response:
    planned = await _apply(ctx, Change("promote", "canary"))
    assert planned.placed is not None
    request.state.model_version = planned.placed.served.predictor.metadata.model_version
    return _placed("primary", planned.placed)


_UNLOAD_DESCRIPTION = (
    "Nothing to unload is not an error (`unloaded_version` is null). Unloading the canary is its "
    "rollback: its users go back to the served model with their next request."
)


async def _unload(ctx: Context, role: Literal["shadow", "canary"]) -> Response:
    planned = await _apply(ctx, Change("unload", role))
    answer = UnloadResponse(role=role, unloaded_version=planned.unloaded)
    return Response(answer.model_dump_json(), media_type="application/json")


@router.delete(
    "/admin/models/shadow",
    dependencies=[scoped(ADMIN)],
    response_model=UnloadResponse,
    responses=errors_doc(401),
    openapi_extra={"security": [{"bearer": []}]},
    summary="Unload the shadow model",
    description=_UNLOAD_DESCRIPTION,
)
async def delete_shadow(ctx: Context) -> Response:
    return await _unload(ctx, "shadow")


@router.delete(
    "/admin/models/canary",
    dependencies=[scoped(ADMIN)],
    response_model=UnloadResponse,
    responses=errors_doc(401),
    openapi_extra={"security": [{"bearer": []}]},
    summary="Unload the canary model (roll back)",
    description=_UNLOAD_DESCRIPTION,
)
async def delete_canary(ctx: Context) -> Response:
    return await _unload(ctx, "canary")
