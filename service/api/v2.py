"""The Open Inference Protocol (KServe V2) REST routes, beside the service's own.

Thin: bodies are read with ``api/body.py`` (same limits and deadline), tensors decoded and answers
encoded by ``service/v2.py``, histories scored by the same ``Scorer`` as ``/predict/batch`` (a small
body through the micro-batcher when others wait, a large one in the thread pool). Errors are the
protocol's ``{"error": "..."}``, counted like every other refusal.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from service.api.body import offload, receive_body
from service.api.deps import AppContext, get_context, require_model, scoped
from service.api.predict import no_other_requests, submit_to_batcher
from service.errors import ErrorDetail, ServiceError, UnsupportedMediaTypeError
from service.lifecycle import LoadedModel
from service.scopes import PREDICT, PUBLIC
from service.v2 import (
    EXTENSIONS,
    FEATURES,
    HEADER_LENGTH,
    HISTORIES,
    MODEL_NAMES,
    InferenceRequest,
    InferenceResponse,
    LiveResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ReadyResponse,
    ServerMetadataResponse,
    Tensor,
    V2ErrorResponse,
    error_text,
    features_tensor,
    header_length,
    history_columns,
    infer_response,
    input_specs,
    model_metadata,
    parse_request,
)

router = APIRouter(tags=["v2"])

_SERVER_NAME = "purchase-intent"
_HEADER = HEADER_LENGTH.lower().encode()
_BINARY = "application/octet-stream"
_NOT_FOUND = 404

ModelName = Annotated[
    str,
    Path(
        description=f"`{HISTORIES}` (raw histories as columns) or `{FEATURES}` (the encoded tensor).",
        json_schema_extra={"enum": list(MODEL_NAMES)},
    ),
]
Version = Annotated[str, Path(description="The served model's version (`GET /v2/models/{name}`).")]


class _UnknownModelError(ServiceError):
    status_code = _NOT_FOUND
    code = "not_found"


def _errors(*statuses: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": V2ErrorResponse, "description": text} for status, text in statuses}


_MODEL_ERRORS = _errors(
    (404, "No such model, or not this version."),
    (503, "No model is ready yet; retry after `Retry-After`."),
)
_INFER_ERRORS = _errors(
    (400, "The JSON is not valid, or the binary extension's header does not fit the body."),
    (404, "No such model, or not this version."),
    (408, "The body did not arrive within the request timeout."),
    (413, "More rows than `PI_MAX_BATCH_USERS`, or a body over `PI_MAX_BODY_BYTES`."),
    (415, "Content-Type is neither JSON nor application/octet-stream."),
    (
        422,
        "An input that is not the model's (name, datatype, shape, element count), or values the "
        "columnar `/predict/batch` refuses (the error names the tensor and index).",
    ),
    (503, "Not ready, at the concurrency limit, or the event store is down; retry after `Retry-After`."),
)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


def _refuse(error: ServiceError, ctx: AppContext) -> Response:
    ctx.metrics.rejected.labels(error.code).inc()
    return _json({"error": error_text(error)}, error.status_code, error.headers)


def _model(name: str) -> str:
    if name not in MODEL_NAMES:
        raise _UnknownModelError(
            "no such model",
            [ErrorDetail(field="name", type="unknown_model", message=f"the models are {list(MODEL_NAMES)}")],
        )
    return name


def _version(served: LoadedModel, version: str | None) -> None:
    served_version = served.predictor.metadata.model_version
    if version is not None and version != served_version:
        raise _UnknownModelError(
            "no such model version",
            [ErrorDetail(field="version", type="unknown_version", message=f"serving {served_version}")],
        )


# --- server --------------------------------------------------------------------------------------


@router.get(
    "/v2", dependencies=[scoped(PUBLIC)], response_model=ServerMetadataResponse, summary="V2 server metadata"
)
async def server_metadata(request: Request) -> Response:
    body = {"name": _SERVER_NAME, "version": request.app.version, "extensions": list(EXTENSIONS)}
    return _json(body)


@router.get(
    "/v2/health/live",
    dependencies=[scoped(PUBLIC)],
    response_model=LiveResponse,
    summary="V2 liveness (as `/healthz`)",
)
async def server_live() -> Response:
    return _json({"live": True})


@router.get(
    "/v2/health/ready",
    dependencies=[scoped(PUBLIC)],
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Not ready: `/readyz` says why."}},
    summary="V2 readiness: a warmed-up model is serving (`/readyz` gives the reason when not)",
)
async def server_ready(request: Request) -> Response:
    ctx = await get_context(request)
    ready = _is_ready(ctx)
    return _json({"ready": ready}, 200 if ready else 503)


def _is_ready(ctx: AppContext) -> bool:
    store = ctx.store
    return ctx.slot.served is not None and not ctx.slot.draining and (store is None or store.up)


# --- models --------------------------------------------------------------------------------------


async def _metadata(request: Request, name: str, version: str | None) -> Response:
    ctx = await get_context(request)
    try:
        _model(name)
        served = require_model(ctx)
        _version(served, version)
    except ServiceError as exc:
        return _refuse(exc, ctx)
    meta = served.predictor.metadata
    return Response(
        model_metadata(name, meta.model_version, meta.feature_spec).model_dump_json(),
        media_type="application/json",
    )


@router.get(
    "/v2/models/{name}",
    dependencies=[scoped(PREDICT)],
    response_model=ModelMetadataResponse,
    responses=_MODEL_ERRORS,
    summary="V2 model metadata: input and output tensors",
)
async def model_metadata_route(request: Request, name: ModelName) -> Response:
    return await _metadata(request, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}",
    dependencies=[scoped(PREDICT)],
    response_model=ModelMetadataResponse,
    responses=_MODEL_ERRORS,
    summary="V2 model metadata of one version",
)
async def model_version_metadata(request: Request, name: ModelName, version: Version) -> Response:
    return await _metadata(request, name, version)


async def _ready(request: Request, name: str, version: str | None) -> Response:
    ctx = await get_context(request)
    try:
        _model(name)
        served = ctx.slot.served
        if served is not None:
            _version(served, version)
    except ServiceError as exc:
        return _refuse(exc, ctx)
    ready = _is_ready(ctx)
    return _json({"name": name, "ready": ready}, 200 if ready else 503)


_READY_ANSWERS: dict[int | str, dict[str, Any]] = {
    503: {"model": ModelReadyResponse, "description": "Not ready (loading, failed, or shutting down)."},
    404: {"model": V2ErrorResponse, "description": "No such model, or not this version."},
}


@router.get(
    "/v2/models/{name}/ready",
    dependencies=[scoped(PUBLIC)],
    response_model=ModelReadyResponse,
    responses=_READY_ANSWERS,
    summary="V2 model readiness",
)
async def model_ready(request: Request, name: ModelName) -> Response:
    return await _ready(request, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    dependencies=[scoped(PUBLIC)],
    response_model=ModelReadyResponse,
    responses=_READY_ANSWERS,
    summary="V2 model readiness of one version",
)
async def model_version_ready(request: Request, name: ModelName, version: Version) -> Response:
    return await _ready(request, name, version)


# --- inference -----------------------------------------------------------------------------------


def _check_media(media_type: str) -> None:
    """JSON, or the binary extension's raw bytes; tritonclient sends no Content-Type at all."""
    if media_type in ("", _BINARY, "application/json") or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    raise UnsupportedMediaTypeError("send the inference request as JSON (or application/octet-stream)")


def _header_value(request: Request) -> str | None:
    for key, value in request.scope["headers"]:
        if key == _HEADER:
            return str(value.decode("latin-1"))
    return None


def _decode(
    ctx: AppContext, served: LoadedModel, name: str, body: bytes, header: str | None
) -> tuple[InferenceRequest, dict[str, Tensor]]:
    specs = input_specs(name, served.predictor.metadata.feature_spec)
    return parse_request(body, header_length(header, len(body)), specs)


def _answer(
    served: LoadedModel, name: str, request: InferenceRequest, probabilities: Any
) -> tuple[bytes, int | None]:
    meta = served.predictor.metadata
    return infer_response(
        request,
        model_name=name,
        model_version=meta.model_version,
        probabilities=probabilities,
        threshold=meta.threshold,
        horizon_days=meta.horizon_days,
    )


def _infer_here(
    ctx: AppContext, served: LoadedModel, name: str, body: bytes, header: str | None, now: int
) -> tuple[bytes, int | None]:
    """Decode, score and encode in one go (in a worker thread for a large body)."""
    request, tensors = _decode(ctx, served, name, body, header)
    settings = ctx.settings
    if name == HISTORIES:
        columns = history_columns(
            tensors, now=now, max_users=settings.max_batch_users, max_events=settings.max_events_per_user
        )
        probabilities = ctx.scorer.score(served.predictor, columns)
    else:
        features = features_tensor(tensors, max_users=settings.max_batch_users)
        probabilities = ctx.scorer.score_features(served.predictor, features)
    return _answer(served, name, request, probabilities)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    ctx = await get_context(request)
    try:
        _model(name)
        served, body, deadline = await receive_body(request.scope, request.receive, ctx, _check_media)
        _version(served, version)
        header = _header_value(request)
        if len(body) > ctx.settings.inline_max_body_bytes:
            answer, json_length = await offload(
                ctx,
                lambda c, s, b, now, _: _infer_here(c, s, name, b, header, now),
                served,
                body,
                deadline,
            )
        elif name == HISTORIES and ctx.batcher is not None and not await no_other_requests(ctx):
            parsed, tensors = _decode(ctx, served, name, body, header)
            settings = ctx.settings
            columns = history_columns(
                tensors,
                now=int(time.time()),
                max_users=settings.max_batch_users,
                max_events=settings.max_events_per_user,
            )
            probabilities = await submit_to_batcher(ctx.batcher, served, columns)
            answer, json_length = _answer(served, name, parsed, probabilities)
        else:
            answer, json_length = _infer_here(ctx, served, name, body, header, int(time.time()))
    except ServiceError as exc:
        return _refuse(exc, ctx)
    if json_length is None:
        return Response(answer, media_type="application/json")
    return Response(answer, media_type=_BINARY, headers={HEADER_LENGTH: str(json_length)})


_INFER_DOC: dict[str, Any] = {
    "responses": {
        **_INFER_ERRORS,
        200: {
            "description": "The outputs `probability` (FP32) and `will_purchase` (BOOL), one per row, as "
            "JSON; with the binary extension (`binary_data_output` or an output's `binary_data`), the "
            f"JSON's length in `{HEADER_LENGTH}` and the raw tensors after it.",
            "content": {_BINARY: {"schema": {"type": "string", "format": "binary"}}},
        },
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": "JSON; or, with Triton's binary tensor data extension, JSON whose length is "
            f"in the `{HEADER_LENGTH}` header followed by each input that carries "
            "`parameters.binary_data_size`, in order (BYTES: a little-endian uint32 length before "
            "each string). See docs/v2.md.",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{InferenceRequest.__name__}"}}
            },
        }
    },
    "response_model": InferenceResponse,
}


@router.post(
    "/v2/models/{name}/infer",
    dependencies=[scoped(PREDICT)],
    summary="V2 inference",
    description=f"`{HISTORIES}`: raw histories as columns (`user_id` BYTES, `offsets` INT64, "
    "`timestamp` INT64 epoch seconds, `amount` FP64, `quantity` INT64, optional `as_of` INT64), "
    f"answered as the columnar `/predict/batch`. `{FEATURES}`: `features` FP32 `[n, bins, channels]`.",
    **_INFER_DOC,
)
async def infer(request: Request, name: ModelName) -> Response:
    return await _infer(request, name, None)


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    dependencies=[scoped(PREDICT)],
    summary="V2 inference on one version",
    **_INFER_DOC,
)
async def infer_version(request: Request, name: ModelName, version: Version) -> Response:
    return await _infer(request, name, version)
