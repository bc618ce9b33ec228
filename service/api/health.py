"""Liveness and readiness. Neither allocates much nor logs: probes arrive forever."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from service.api.deps import Context, scoped
from service.schemas import HealthResponse, ReadinessResponse
from service.scopes import PUBLIC

router = APIRouter(tags=["health"])

_ALIVE = HealthResponse(status="ok").model_dump_json().encode()


@router.get(
    "/healthz",
    dependencies=[scoped(PUBLIC)],
    response_model=HealthResponse,
    summary="Liveness: the process answers",
    description="Always 200 while the process runs, whatever the model's state. Use it as the "
    "liveness probe; use `/readyz` to decide whether to send traffic.",
)
async def healthz() -> Response:
    return Response(_ALIVE, media_type="application/json")


@router.get(
    "/readyz",
    dependencies=[scoped(PUBLIC)],
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
    "moment a shutdown starts (SIGTERM), and while the event store is down (`store_unavailable`). Reports "
    "the model version and the execution provider onnxruntime really uses.",
)
async def readyz(ctx: Context) -> Response:
    slot = ctx.slot
    served = slot.served
    store = ctx.store
    store_state = None if store is None else ("ok" if store.up else "unavailable")
    cluster = ctx.cluster
    if cluster is not None and served is not None and not slot.draining and store_state != "unavailable":
        ready = cluster.workers_ready()
        if ready < cluster.size:  # every worker ready, or none of them takes traffic
            body = ReadinessResponse(
                ready=False,
                status="workers_not_ready",
                reason=f"{ready} of {cluster.size} worker processes ready",
                model_version=served.predictor.metadata.model_version,
                provider=None,
                provider_fallback=None,
                store=store_state,
            )
            return Response(body.model_dump_json(), status_code=503, media_type="application/json")
    if served is None or slot.draining or store_state == "unavailable":
        status: str = slot.status
        reason = slot.reason
        if served is not None and not slot.draining and store is not None:
            status, reason = "store_unavailable", store.reason
        body = ReadinessResponse(
            ready=False,
            status=status,
            reason=reason,
            model_version=None if served is None else served.predictor.metadata.model_version,
            provider=None,
            provider_fallback=None,
            store=store_state,
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
        store=store_state,
    )
    return Response(body.model_dump_json(), media_type="application/json")
