"""``GET /v1/model/performance``: live accuracy from realized outcomes and score drift, per model
version, as JSON: the snapshot the monitoring tasks last computed (``service/monitor.py``), the
same numbers ``/metrics`` exports. Nothing is computed per request."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from service.api.deps import Context, scoped
from service.api.openapi import errors_doc
from service.errors import ErrorDetail, InvalidInputError, UnknownModelVersionError
from service.monitor import Monitor, offline_metrics, report_versions
from service.quality import Quality
from service.scopes import METRICS

router = APIRouter(tags=["model"])


class OutcomesState(BaseModel):
    enabled: bool = Field(
        description="Served predictions are recorded (`PI_OUTCOMES`; needs the event store)."
    )
    sample_rate: float = Field(description="Share of users recorded (`PI_OUTCOMES_SAMPLE_RATE`).")
    window_days: int = Field(description="Live metrics cover horizons that ended within this many days.")
    grace_seconds: int = Field(description="Settled once the event clock is this far past the horizon.")
    event_clock: str | None = Field(
        description="Latest event time the store has seen, RFC 3339; null before any."
    )
    settled_by: str | None = Field(
        description="Horizons ending by here are settled (the clock, capped at now, minus the grace)."
    )
    evaluated_at: str | None = Field(description="When the outcome job last finished a round, RFC 3339.")
    unsettled: int = Field(description="Recorded predictions whose outcome is not known yet.")
    overdue: int = Field(description="Of those, horizons that ended (plus the grace) by the wall clock.")


class DriftState(BaseModel):
    enabled: bool = Field(description="`PI_DRIFT`.")
    window_scores: int = Field(description="Recent scores per version that PSI and KS cover.")
    min_scores: int = Field(description="PSI and KS appear once a window holds this many.")
    psi_threshold: float = Field(description="The drift alert's threshold (`PI_DRIFT_PSI_THRESHOLD`).")


class CalibrationOut(BaseModel):
    decile: int = Field(description="1 = the lowest tenth of the predictions.")
    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_rate: float


class LiveOut(BaseModel):
    matured: int = Field(description="Settled predictions with a known outcome in the window.")
    positives: int
    base_rate: float
    mean_predicted: float
    roc_auc: float | None = Field(description="Null until both outcomes have been seen.")
    brier: float
    log_loss: float
    calibration: list[CalibrationOut] = Field(description="By decile of the predicted probability.")


class OfflineOut(BaseModel):
    roc_auc: float | None
    brier: float | None


class ModelDriftOut(BaseModel):
    reference: bool | None = Field(description="The model file has a score reference; null: not loaded here.")
    scores: int = Field(description="Recent scores held.")
    psi: float | None
    ks: float | None


class ModelPerformance(BaseModel):
    model_version: str
    served: bool = Field(description="The version this process serves now.")
    offline: OfflineOut | None = Field(description="The exporter's test-set figures; null: not loaded here.")
    live: LiveOut | None = Field(description="Null until predictions of this version have matured.")
    drift: ModelDriftOut


_EXAMPLE_LIVE: dict[str, Any] = {
    "matured": 23570,
    "positives": 3317,
    "base_rate": 0.1407,
    "mean_predicted": 0.1382,
    "roc_auc": 0.8409,
    "brier": 0.0887,
    "log_loss": 0.2976,
    "calibration": [
        {
            "decile": 10,
            "lower": 0.402,
            "upper": 0.968,
            "count": 2357,
            "mean_predicted": 0.571,
            "observed_rate": 0.583,
        }
    ],
}


class PerformanceResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "outcomes": {
                        "enabled": True,
                        "sample_rate": 1.0,
                        "window_days": 28,
                        "grace_seconds": 86400,
                        "event_clock": "1998-07-02T00:00:00Z",
                        "settled_by": "1998-07-01T00:00:00Z",
                        "evaluated_at": "2026-11-30T12:00:00Z",
                        "unsettled": 0,
                        "overdue": 0,
                    },
                    "drift": {
                        "enabled": True,
                        "window_scores": 10000,
                        "min_scores": 1000,
                        "psi_threshold": 0.2,
                    },
                    "models": [
                        {
                            "model_version": "cln-out-of-time-19980331-1d578ddc5b",
                            "served": True,
                            "offline": {"roc_auc": 0.8409, "brier": 0.0887},
                            "live": _EXAMPLE_LIVE,
                            "drift": {"reference": True, "scores": 10000, "psi": 0.004, "ks": 0.012},
                        }
                    ],
                }
            ]
        }
    )

    outcomes: OutcomesState
    drift: DriftState
    models: list[ModelPerformance] = Field(
        description="The versions this process served most recently, then any other with matured predictions."
    )


def _time(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, tz=UTC).isoformat().replace("+00:00", "Z")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _live(q: Quality) -> LiveOut:
    return LiveOut(
        matured=q.count,
        positives=q.positives,
        base_rate=q.base_rate,
        mean_predicted=q.mean_predicted,
        roc_auc=_finite(q.roc_auc),
        brier=q.brier,
        log_loss=q.log_loss,
        calibration=[CalibrationOut(**vars(g)) for g in q.calibration],
    )


def _model(monitor: Monitor, version: str, served: str | None) -> ModelPerformance:
    meta = next((m for m in monitor.models() if m.model_version == version), None)
    state = monitor.drift_of(version)
    quality = monitor.live.quality.get(version)
    offline = None
    if meta is not None:
        figures = offline_metrics(meta)
        offline = OfflineOut(roc_auc=figures.get("roc_auc"), brier=figures.get("brier"))
    return ModelPerformance(
        model_version=version,
        served=version == served,
        offline=offline,
        live=None if quality is None else _live(quality),
        drift=ModelDriftOut(
            reference=None if meta is None else meta.score_reference is not None,
            scores=0 if state is None else len(state.window),
            psi=None if state is None else state.psi,
            ks=None if state is None else state.ks,
        ),
    )


@router.get(
    "/v1/model/performance",
    dependencies=[scoped(METRICS)],
    response_model=PerformanceResponse,
    responses=errors_doc(
        (
            404,
            "No version by that name was served here or has matured predictions (`unknown_model_version`).",
        ),
        (422, "A bad query parameter."),
    ),
    summary="Live accuracy and score drift per model version",
    description="Once a prediction's horizon has passed (by the events' own clock), its outcome is read "
    "from the stored purchases: ROC AUC, Brier, log loss, base rate and calibration by decile over "
    "the window, next to the exporter's offline figures; PSI and Kolmogorov-Smirnov of recent scores "
    "against the model's reference distribution. The last computed figures, as `/metrics` exports them.",
)
async def performance(
    request: Request,
    ctx: Context,
    model_version: Annotated[
        str | None, Query(min_length=1, max_length=256, description="Only this version.")
    ] = None,
) -> Response:
    unknown = [name for name in request.query_params if name != "model_version"]
    if unknown:  # a misspelt filter would otherwise answer every version, silently
        raise InvalidInputError(
            "unknown query parameter",
            [
                ErrorDetail(field=name[:64], type="unknown_parameter", message="not a parameter")
                for name in unknown[:8]
            ],
        )
    monitor = ctx.monitor
    assert monitor is not None
    served = ctx.slot.served
    versions = report_versions(monitor, model_version, None if served is None else served.predictor.metadata)
    if versions is None:
        raise UnknownModelVersionError(
            "no such model version here",
            [
                ErrorDetail(
                    field="model_version",
                    type="unknown_model_version",
                    message="not served here, nothing matured",
                )
            ],
        )
    s = ctx.settings
    live = monitor.live
    current = None if served is None else served.predictor.metadata.model_version
    body = PerformanceResponse(
        outcomes=OutcomesState(
            enabled=monitor.recorder is not None,
            sample_rate=s.outcomes_sample_rate,
            window_days=s.outcomes_window_days,
            grace_seconds=s.outcomes_grace_seconds,
            event_clock=_time(live.event_clock),
            settled_by=_time(live.settled_by),
            evaluated_at=_time(live.evaluated_at),
            unsettled=live.unsettled,
            overdue=live.overdue,
        ),
        drift=DriftState(
            enabled=s.drift,
            window_scores=s.drift_window_scores,
            min_scores=s.drift_min_scores,
            psi_threshold=s.drift_psi_threshold,
        ),
        models=[_model(monitor, v, current) for v in versions],
    )
    return Response(body.model_dump_json(), media_type="application/json")
