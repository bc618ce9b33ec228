"""What a request handler gets from the app: the lifespan state, through one dependency, and the
checks routes share (a served model, the event store, the route's scope)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, cast

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from starlette.types import Scope

from service.auth import AUDITED, Access, Principal
from service.batching import Batcher
from service.cluster import Cluster
from service.config import Settings
from service.errors import NotReadyError, ServiceError, StoreUnavailableError
from service.history import HistoryReads
from service.lifecycle import LoadedModel, ModelSlot
from service.limits import Admission
from service.metrics import Metrics
from service.monitor import Monitor
from service.rollout import Coordinator
from service.scoring import Scorer
from service.shadow import ShadowScorer
from service.store import GuardedStore, StoreDownError

T = TypeVar("T")


@dataclass(frozen=True)
class AppContext:
    """Everything the routers need; built by the app factory, handed out via lifespan state."""

    settings: Settings
    slot: ModelSlot
    metrics: Metrics
    scorer: Scorer
    limiter: anyio.CapacityLimiter  # threads for large requests; created inside the running loop
    reload_lock: anyio.Lock  # one model load at a time: the first load and hot swaps
    access: Access  # tokens, scopes, rate limits, audit (service/auth.py)
    store: GuardedStore | None = None  # the event store (PI_STORE_BACKEND), None when "none"
    store_limiter: anyio.CapacityLimiter | None = None  # threads for writes and admin history calls
    batcher: Batcher | None = None  # micro-batching of small /predict calls; None when switched off
    admission: Admission | None = None  # prediction requests in progress (service.limits)
    history_reads: HistoryReads | None = None  # gathers by-id store reads; None without a store
    monitor: Monitor | None = None  # live quality and drift (service/monitor.py)
    shadow: ShadowScorer | None = None  # the shadow model's scoring thread (service/shadow.py)
    cluster: Cluster | None = None  # the other worker processes (service/cluster.py); None: one process
    coordinator: Coordinator | None = None  # admin changes across them (service/siblings.py)


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


def require_store(ctx: AppContext) -> tuple[GuardedStore, anyio.CapacityLimiter]:
    assert ctx.store is not None
    assert ctx.store_limiter is not None
    return ctx.store, ctx.store_limiter


async def in_store_thread(ctx: AppContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` (which calls the store) in a store thread; a store that is down is a 503."""
    _, limiter = require_store(ctx)
    try:
        return await anyio.to_thread.run_sync(fn, limiter=limiter)
    except StoreDownError as exc:
        raise StoreUnavailableError.retry_later(str(exc)) from None


class Scoped:
    """The dependency every route declares (``dependencies=[scoped(scope)]``): the token check,
    the rate limit, and for audited scopes the note the request middleware logs once answered.
    A class, so a test can read each route's scope off its dependencies."""

    def __init__(self, scope: str, also: frozenset[str] = frozenset()) -> None:
        self.scope = scope
        self.also = also

    async def __call__(self, request: Request) -> None:
        ctx: AppContext = request.state.context
        check_scope(ctx, request.scope, self.scope, self.also)


def check_scope(
    ctx: AppContext, scope: Scope, required: str, also: frozenset[str] = frozenset()
) -> Principal:
    """The token check of a request to a route of scope ``required`` (or one of ``also``): who
    calls (401 if unknown), whether they may (403, 429); audited scopes leave their note in the
    request's state for the access middleware."""
    access = ctx.access
    required = access.requires(required)
    audited = required in AUDITED
    try:
        principal = access.identify(scope["headers"], required)
    except ServiceError:
        if audited:
            scope["state"]["audit"] = (required, None)
        raise
    if audited:
        scope["state"]["audit"] = (required, principal)
    client = scope.get("client")
    access.authorize(principal, required, client[0] if client else None, also)
    return principal


def scoped(scope: str, *also: str) -> Any:
    """``Depends`` on :class:`Scoped`: the route needs ``scope`` (``service.scopes``), or one of
    ``also``."""
    return Depends(Scoped(scope, frozenset(also)))
