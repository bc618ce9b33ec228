"""The app factory: settings and injected parts in, a FastAPI app out. Nothing happens at import.

``create_app(settings)`` is what ``python -m service`` serves; tests pass a fake ``predictor``
(anything following :class:`service.predictor.Predictor`) and a fresh ``registry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import admin, batch, docs, events, health, model, performance, predict, users, v2
from service.api import metrics as metrics_route
from service.api.deps import AppContext
from service.api.errors import install_error_handlers
from service.api.openapi import publish_request_schemas, route_scopes
from service.auth import Access
from service.batching import Batcher
from service.cluster import Cluster
from service.config import Settings
from service.errors import REJECT_REASONS, ServiceError
from service.history import HistoryReads
from service.lifecycle import ModelSlot, load_model, publish_models
from service.limits import Admission, LimitMiddleware
from service.metrics import Metrics
from service.middleware import RequestMiddleware
from service.monitor import Monitor, watch
from service.predictor import Predictor
from service.rollout import load_configured
from service.schemas import (
    BatchPredictRequest,
    CanaryRequest,
    ColumnarEvents,
    ColumnarPredictRequest,
    PredictRequest,
    ReloadRequest,
    ShadowRequest,
)
from service.scoring import Scorer
from service.shadow import ShadowScorer
from service.siblings import Coordinator, handler, restore
from service.store import EventStore, GuardedStore, StoreDownError, open_store
from service.store.metrics import StoreMetrics
from service.store.upkeep import compact_periodically, watch_health
from service.v2 import InferenceRequest

logger = logging.getLogger("service")

#: How often a worker process refreshes its readiness cell (a SIGTERM clears it at once).
READY_REPORT_SECONDS = 0.1

_DESCRIPTION = """\
Per-user purchase-intent predictions: send a user's purchase events, get the probability that
they buy again within the model's horizon. Features are computed by the same code that trained
the model, from the feature spec stored in the model file.

Every error is JSON: `{"error": code, "message": ..., "detail": [{"field", "type", "message"}]}`.
"""


class ServiceApp(FastAPI):
    """FastAPI, except that ``POST /predict`` skips FastAPI's own layers (``serve_predict``).

    The direct route still runs inside the same request and limit middleware (one admission count
    shared with the app's), is listed in the OpenAPI document by its FastAPI declaration, and is
    labelled with that route in metrics. Every other request, and lifespan, is FastAPI's.
    """

    direct_predict: ASGIApp | None = None
    predict_route: BaseRoute | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.direct_predict is not None
            and scope["type"] == "http"
            and scope["path"] == "/predict"
            and scope["method"] == "POST"
        ):
            scope["route"] = self.predict_route
            await self.direct_predict(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _report_ready(cluster: Cluster, slot: ModelSlot, store: GuardedStore | None) -> None:
    """Keep this worker's readiness cell current: ``/readyz`` in any worker reads every cell."""
    while True:
        cluster.set_ready(slot.ready and (store is None or store.up))
        await asyncio.sleep(READY_REPORT_SECONDS)


def create_app(
    settings: Settings,
    *,
    predictor: Predictor | None = None,
    registry: CollectorRegistry | None = None,
    on_load_failure: Callable[[str], None] | None = None,
    slot: ModelSlot | None = None,
    store: EventStore | None = None,
    cluster: Cluster | None = None,
) -> ServiceApp:
    """Build the app. The model is loaded (or ``predictor`` warmed up) after start-up, in the
    background; ``on_load_failure`` is called with the cause if that fails. ``slot`` is passed
    in by the CLI, whose signal handler drains it (readiness 503) on SIGTERM. ``store`` replaces
    the configured event store backend (tests). ``cluster`` makes this app one of several worker
    processes (``service/workers.py``): admin changes, scrapes, readiness and erasures then span
    them all, and only worker 0 runs the store's periodic jobs."""
    metrics = Metrics(
        registry if registry is not None else CollectorRegistry(),
        latency_buckets=settings.latency_buckets,
        reject_reasons=REJECT_REASONS,
    )
    model_slot = slot if slot is not None else ModelSlot()
    model_slot.on_switch = lambda models, previous: publish_models(metrics, models, previous)
    leader = cluster is None or cluster.leader
    admission = Admission(settings.max_concurrent_requests)
    backend = store if store is not None else open_store(settings)  # no I/O until first use
    guarded = (
        None
        if backend is None
        else GuardedStore(backend, StoreMetrics(metrics.registry, latency_buckets=settings.latency_buckets))
    )
    metrics.ready.set_function(lambda: 1.0 if model_slot.ready and (guarded is None or guarded.up) else 0.0)
    monitor = Monitor(settings, metrics.registry)
    access = Access(settings, metrics.registry)  # reads the tokens file: a bad one fails here

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        shadow = ShadowScorer(
            model_slot, metrics.registry, queue_size=settings.shadow_queue_size, monitor=monitor
        )
        shadow.start()
        scorer = Scorer(metrics, monitor, shadow)
        batcher = None
        if settings.microbatch:
            batcher = Batcher(
                lambda served, columns: scorer.score(served.predictor, columns),
                max_users=settings.microbatch_max_users,
                max_wait_s=settings.microbatch_max_wait_seconds,
                max_queue=settings.microbatch_queue_size,
                queue_wait=metrics.batch_queue_duration,
            )
            batcher.start()  # its queue and task belong to this running loop
        store_limiter = anyio.CapacityLimiter(settings.store_threads)
        history_reads = None
        if guarded is not None:
            history_reads = HistoryReads(guarded, store_limiter, max_users=settings.microbatch_max_users)
            history_reads.start()
        context = AppContext(
            settings=settings,
            slot=model_slot,
            metrics=metrics,
            scorer=scorer,
            limiter=anyio.CapacityLimiter(settings.batch_threads),
            reload_lock=anyio.Lock(),
            access=access,
            store=guarded,
            store_limiter=store_limiter,
            batcher=batcher,
            admission=admission,
            history_reads=history_reads,
            monitor=monitor,
            shadow=shadow,
            cluster=cluster,
            coordinator=None if cluster is None else Coordinator(cluster, model_slot),
        )
        upkeep: list[asyncio.Task[None]] = []
        if guarded is not None:
            limiter = context.store_limiter
            assert limiter is not None
            upkeep.append(asyncio.create_task(watch_health(guarded, limiter)))
            if leader:
                upkeep.append(
                    asyncio.create_task(compact_periodically(guarded, settings, model_slot, limiter))
                )
        upkeep.append(asyncio.create_task(watch(monitor, model_slot, guarded, settle=leader)))
        if cluster is not None:
            await cluster.serve(handler(context))  # before loading: a change meanwhile is refused
            upkeep.append(asyncio.create_task(_report_ready(cluster, model_slot, guarded)))

        async def load_models() -> None:
            if cluster is not None:
                async with cluster.exclusive():  # no change commits while the state is read
                    state = cluster.read_state()
                if state is not None:
                    try:
                        await restore(model_slot, settings, metrics, state)
                    except ServiceError as exc:
                        model_slot.fail("the other workers' models failed to load; see the service log")
                        logger.error(f"cannot serve: {exc}")
                        if on_load_failure is not None:
                            on_load_failure(str(exc))
                    return
            await load_model(
                model_slot,
                settings,
                metrics,
                lock=context.reload_lock,
                predictor=predictor,
                on_failure=on_load_failure,
            )
            await load_configured(model_slot, settings, metrics, lock=context.reload_lock)

        loading = asyncio.create_task(load_models())
        try:
            yield {"context": context}
        finally:
            model_slot.drain()
            for task in (loading, *upkeep):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if cluster is not None:
                cluster.set_ready(False)
                await cluster.close()
            if batcher is not None:
                await batcher.stop()
            await anyio.to_thread.run_sync(shadow.stop)
            if history_reads is not None:
                await history_reads.stop()
            if guarded is not None:
                if monitor.recorder is not None:  # what was served since the last flush
                    with contextlib.suppress(StoreDownError):  # counted as dropped
                        await anyio.to_thread.run_sync(monitor.flush, guarded)
                await anyio.to_thread.run_sync(guarded.close)

    app = ServiceApp(
        title="purchase-intent",
        version=metadata.version("purchase-intent"),  # written once, in pyproject.toml
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from the package's own assets (service/api/docs.py), not a CDN
        redoc_url=None,
    )
    routers = (
        predict.router,
        batch.router,
        model.router,
        performance.router,
        health.router,
        metrics_route.router,
        v2.router,
        docs.router,
    )
    for router in routers:
        app.include_router(router)
    admin_enabled = settings.admin_token is not None or access.enabled
    if admin_enabled:  # no way to authorise, no endpoint: a 404 like any unknown path
        app.include_router(admin.router)
    if guarded is not None:
        app.include_router(events.router)
        if admin_enabled:
            app.include_router(users.router)
    install_error_handlers(app, metrics)
    limits: dict[str, Any] = {
        "metrics": metrics,
        "max_body_bytes": settings.max_body_bytes,
        "admission": admission,
    }
    # added first = inside RequestMiddleware, which times, logs and counts what this one refuses
    app.add_middleware(LimitMiddleware, **limits)
    app.add_middleware(RequestMiddleware, metrics=metrics, access=access)
    app.direct_predict = RequestMiddleware(
        LimitMiddleware(predict.serve_predict, **limits), metrics=metrics, access=access
    )
    app.predict_route = next(r for r in predict.router.routes if getattr(r, "path", None) == "/predict")
    publish_request_schemas(
        app,
        (
            PredictRequest,
            BatchPredictRequest,
            ColumnarPredictRequest,
            ReloadRequest,
            ShadowRequest,
            CanaryRequest,
            events.EventsRequest,
            InferenceRequest,
        ),
        bearer=admin_enabled,
        scopes=(lambda: {op: access.requires(s) for op, s in route_scopes(app.routes).items()})
        if access.enabled
        else None,
        rate_limited=frozenset(settings.rate_limits),
        # more users than this is a 413, more events (one user's, or one /events body) a 422
        list_limits=(
            (BatchPredictRequest, "users", settings.max_batch_users),
            (ColumnarEvents, "user_id", settings.max_batch_users),
            (PredictRequest, "events", settings.max_events_per_user),
            (events.EventsRequest, "events", settings.max_events_per_user),
        ),
    )
    return app
