"""What a request handler gets from the app: the lifespan state, through one dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

import anyio
from fastapi import Depends, Request

from service.batching import Batcher
from service.config import Settings
from service.errors import NotReadyError
from service.history import HistoryReads
from service.lifecycle import LoadedModel, ModelSlot
from service.limits import Admission
from service.metrics import Metrics
from service.scoring import Scorer
from service.store import GuardedStore


@dataclass(frozen=True)
class AppContext:
    """Everything the routers need; built by the app factory, handed out via lifespan state."""

    settings: Settings
    slot: ModelSlot
    metrics: Metrics
    scorer: Scorer
    limiter: anyio.CapacityLimiter  # threads for large requests; created inside the running loop
    reload_lock: anyio.Lock  # one model load at a time: the first load and hot swaps
    store: GuardedStore | None = None  # the event store (PI_STORE_BACKEND), None when "none"
    store_limiter: anyio.CapacityLimiter | None = None  # threads for writes and admin history calls
    batcher: Batcher | None = None  # micro-batching of small /predict calls; None when switched off
    admission: Admission | None = None  # prediction requests in progress (service.limits)
    history_reads: HistoryReads | None = None  # gathers by-id store reads; None without a store


async def get_context(request: Request) -> AppContext:
    # async on purpose: FastAPI runs a plain-def dependency in a worker thread, one hop per request
    # for a dictionary lookup.
    return cast(AppContext, request.state.context)


Context = Annotated[AppContext, Depends(get_context)]


def require_model(ctx: AppContext) -> LoadedModel:
    """The served model, or a 503 that tells the client to retry."""
    served = ctx.slot.served
    if served is None:
        raise NotReadyError(ctx.slot.reason or "not ready")
    return served
