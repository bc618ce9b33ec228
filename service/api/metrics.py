"""``GET /metrics`` as a plain route: a mounted ASGI sub-app would answer ``/metrics`` with a redirect."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from starlette.responses import Response

from service.api.deps import Context, scoped
from service.cluster import MergedCollector
from service.scopes import METRICS
from service.siblings import scrape

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    dependencies=[scoped(METRICS)],
    summary="Prometheus metrics",
    description="Prometheus text exposition format 0.0.4, which every Prometheus 2.x and 3.x "
    "scrapes; the README lists each metric.",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": "# HELP purchase_intent_users_scored_total Users given a probability.\n"
                    "# TYPE purchase_intent_users_scored_total counter\n"
                    "purchase_intent_users_scored_total 1042.0\n"
                }
            }
        }
    },
)
async def metrics(ctx: Context) -> Response:
    registry = ctx.metrics.registry
    if ctx.cluster is not None:  # every worker process's metrics, whichever answers
        merged = CollectorRegistry()
        merged.register(MergedCollector(await scrape(ctx, ctx.cluster)))
        registry = merged
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)
