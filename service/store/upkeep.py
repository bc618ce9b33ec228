"""Background work on the store: a health check that readiness reads, and periodic compaction,
which leaves raw whatever recorded predictions still need to be settled (:func:`outcome_days`).

Both run as tasks of the app's lifespan and call the store in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import time

import anyio
import anyio.to_thread

from service.config import Settings
from service.features import SECONDS_PER_DAY, FeatureSpec
from service.lifecycle import ModelSlot
from service.store.base import Compacted, StoreDownError
from service.store.guard import GuardedStore

logger = logging.getLogger(__name__)

#: Seconds between health checks: how long readiness may lag behind a store going down or back up
#: (a failed request call flips it at once).
HEALTH_INTERVAL_SECONDS = 1.0


def horizon(now: float, settings: Settings, spec: FeatureSpec, outcome_days: int = 0) -> tuple[int, float]:
    """``(before_day, ingested_before)`` for a compaction at ``now``: fold purchases on days before
    ``before_day`` (retention, never inside the model's window for an ``as_of`` of now or later,
    and never inside ``outcome_days``, where predictions still wait for their outcome) that were
    stored before ``ingested_before`` (so their ids still dedupe retries)."""
    keep_days = max(settings.store_retention_days, spec.lookback_bins * spec.bin_days, outcome_days)
    return int(now // SECONDS_PER_DAY) - keep_days, now - settings.store_dedup_seconds


def outcome_days(settings: Settings, horizon_days: int) -> int:
    """Days of raw events that recorded predictions need: a prediction made now is settled a
    horizon and a grace later, from the raw purchases in its horizon (a fold only says which days
    it spans). 0 when no outcome is recorded."""
    if not settings.records_outcomes:
        return 0
    return horizon_days + -(-settings.outcomes_grace_seconds // SECONDS_PER_DAY) + 1


def compact_once(
    store: GuardedStore, settings: Settings, spec: FeatureSpec, now: float, horizon_days: int = 0
) -> Compacted:
    before_day, ingested_before = horizon(now, settings, spec, outcome_days(settings, horizon_days))
    return store.compact(before_day, ingested_before)


async def watch_health(store: GuardedStore, limiter: anyio.CapacityLimiter) -> None:
    while True:
        with contextlib.suppress(StoreDownError):  # GuardedStore logs it, readiness reports it
            await anyio.to_thread.run_sync(store.ping, limiter=limiter)
        await anyio.sleep(HEALTH_INTERVAL_SECONDS)


async def compact_periodically(
    store: GuardedStore, settings: Settings, slot: ModelSlot, limiter: anyio.CapacityLimiter
) -> None:
    interval = settings.store_compact_interval_seconds
    if interval <= 0:
        return
    while True:
        await anyio.sleep(interval)
        served = slot.served
        if served is None:
            continue  # the horizon depends on the model's lookback
        meta = served.predictor.metadata
        started = time.perf_counter()
        try:
            result = await anyio.to_thread.run_sync(
                compact_once,
                store,
                settings,
                meta.feature_spec,
                time.time(),
                meta.horizon_days,
                limiter=limiter,
            )
        except StoreDownError:
            continue
        logger.info(
            "event store compacted",
            extra={
                "users": result.users,
                "events": result.events,
                "duration_seconds": round(time.perf_counter() - started, 3),
            },
        )
