"""Liveness and readiness. Neither allocates much nor logs: probes arrive forever."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from service.api.deps import Context
from service.schemas import HealthResponse, ReadinessResponse

router = APIRouter(tags=["health"])

_ALIVE = HealthResponse(status="ok").model_dump_json().encode()


@router.get(
    "/healthz",
    response_model=HealthResponse,
    summary="Liveness: the process answers",
    description="Always 200 while the process runs, whatever the model's state. Use it as the "
    "liveness probe; use `/readyz` to decide whether to send traffic.",
)
async def healthz() -> Response:
    return Response(_ALIVE, media_type="application/json")


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    responses={
        503: {
            "model": ReadinessResponse,
            "description": "Loading, the model failed to load, or shutting down (`draining`).",
        }
    },
    summary="Readiness: a warmed-up model is serving",
    description="200 once the model is loaded and has answered a warm-up inference at every batch "
    "size the server can produce; 503 with a reason before that, if loading failed, or from the "
    "moment a shutdown starts (SIGTERM). Reports "
    "the model version and the execution provider onnxruntime really uses.",
)
async def readyz(ctx: Context) -> Response:
    slot = ctx.slot
    served = slot.served
    if served is None or slot.draining:
        body = ReadinessResponse(
            ready=False,
            status=slot.status,
            reason=slot.reason,
            model_version=None if served is None else served.predictor.metadata.model_version,
            provider=None,
            provider_fallback=None,
        )
        return Response(body.model_dump_json(), status_code=503, media_type="application/json")
    runtime = served.predictor.runtime
    body = ReadinessResponse(
        ready=True,
        status="ready",
        reason=None,
        model_version=served.predictor.metadata.model_version,
        provider=runtime.provider,
        provider_fallback=runtime.fallback,
    )
    return Response(body.model_dump_json(), media_type="application/json")
