"""``GET /v1/model``: what is being served and how it runs."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from starlette.responses import Response

from service.api.deps import AppContext, Context, require_model, scoped
from service.api.openapi import errors_doc
from service.lifecycle import LoadedModel, Role, loaded_models
from service.schemas import LoadedModelResponse, ModelResponse, RuntimeResponse
from service.scopes import PREDICT, PREDICT_STORED

router = APIRouter(tags=["model"])


@router.get(
    "/v1/model",
    dependencies=[scoped(PREDICT, PREDICT_STORED)],
    response_model=ModelResponse,
    responses=errors_doc((503, "No model loaded yet.")),
    summary="The served model's metadata",
    description="Version, feature spec, decision threshold, horizon and training metrics as "
    "written by the exporter, plus the execution providers asked for and actually used; "
    "`loaded` lists every model loaded (served, shadow, canary) with its share of the traffic.",
)
async def model_info(ctx: Context) -> Response:
    served = require_model(ctx)
    meta = served.predictor.metadata
    runtime = served.predictor.runtime
    body = ModelResponse(
        model_version=meta.model_version,
        created_at=meta.created_at,
        threshold=meta.threshold,
        horizon_weeks=meta.horizon_weeks,
        horizon_days=meta.horizon_days,
        protocol=meta.protocol,
        cutoff=meta.cutoff,
        data_fingerprint=meta.data_fingerprint,
        feature_spec=meta.feature_spec.to_dict(),
        training_metrics=meta.training_metrics,
        hyperparameters=meta.hyperparameters,
        opset=meta.opset,
        n_seeds=meta.n_seeds,
        format_version=meta.format_version,
        runtime=RuntimeResponse(
            requested_providers=list(runtime.requested),
            active_providers=list(runtime.active),
            provider=runtime.provider,
            provider_fallback=runtime.fallback,
            batch_sizes=list(runtime.batch_sizes),
            load_seconds=served.load_seconds,
            loaded_at=_rfc3339(served.loaded_at),
        ),
        loaded=[_loaded(ctx, role, model) for role, model in loaded_models(ctx.slot)],
    )
    return Response(body.model_dump_json(), media_type="application/json")


def _rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).isoformat(timespec="milliseconds")


def _loaded(ctx: AppContext, role: Role, model: LoadedModel) -> LoadedModelResponse:
    meta = model.predictor.metadata
    shadow, canary = ctx.slot.shadow, ctx.slot.canary
    return LoadedModelResponse(
        role=role,
        model_version=meta.model_version,
        horizon_days=meta.horizon_days,
        threshold=meta.threshold,
        sample=shadow.sample if role == "shadow" and shadow is not None else None,
        percent=canary.percent if role == "canary" and canary is not None else None,
        load_seconds=model.load_seconds,
        loaded_at=_rfc3339(model.loaded_at),
    )
