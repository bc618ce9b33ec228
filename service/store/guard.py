"""The store as the service uses it: any backend, timed, errors counted, health tracked."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis

from service.config import Settings
from service.store.base import (
    Appended,
    Backlog,
    Compacted,
    EventStore,
    History,
    NewEvent,
    Page,
    Prediction,
    Settled,
    StoreDownError,
)
from service.store.metrics import StoreMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What a backend raises when it cannot serve: the store is down (503), not a bug (500).
_DOWN = (sqlite3.Error, redis.RedisError, OSError)


def open_store(settings: Settings) -> EventStore | None:
    """The configured backend (no I/O yet: connections open on first use), or ``None``."""
    if settings.store_backend == "sqlite":
        from service.store.sqlite import SQLiteStore

        return SQLiteStore(settings.store_path, timeout=settings.store_timeout_seconds)
    if settings.store_backend == "redis":
        from service.store.redis import RedisStore

        return RedisStore(
            settings.redis_url.get_secret_value(),
            prefix=settings.redis_key_prefix,
            timeout=settings.store_timeout_seconds,
            persist_timeout=settings.store_erase_persist_seconds,
        )
    return None


class GuardedStore:
    """Blocking, like the backend: call it from worker threads."""

    def __init__(self, backend: EventStore, metrics: StoreMetrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.up = False  # until the first health check or call succeeds
        self.reason: str | None = "event store not checked yet"
        self._down_logged = False
        metrics.up.set_function(lambda: 1.0 if self.up else 0.0)

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            result = fn()
        except _DOWN as exc:
            self.metrics.errors.labels(operation).inc()
            if self.up or not self._down_logged:  # once per outage, not once per request
                self._down_logged = True
                logger.error(
                    "event store unavailable",
                    extra={"backend": self.backend.backend, "operation": operation, "cause": repr(exc)},
                )
            self.up, self.reason = False, f"event store unavailable ({self.backend.backend})"
            raise StoreDownError(self.reason) from exc
        self.metrics.duration.labels(operation).observe(time.perf_counter() - started)
        if not self.up:
            logger.info("event store available", extra={"backend": self.backend.backend})
        self.up, self.reason, self._down_logged = True, None, False
        return result

    def append(self, events: Sequence[NewEvent], now: float) -> Appended:
        result = self._call("write", lambda: self.backend.append(events, now))
        self.metrics.ingested.inc(result.stored)
        self.metrics.duplicates.inc(result.duplicates)
        return result

    def histories(self, user_ids: Sequence[str]) -> dict[str, History]:
        return self._call("read", lambda: self.backend.histories(user_ids))

    def page(self, user_id: str, offset: int, limit: int) -> Page | None:
        return self._call("list", lambda: self.backend.page(user_id, offset, limit))

    def erase(self, user_id: str) -> int:
        return self._call("erase", lambda: self.backend.erase(user_id))

    def compact(self, before_day: int, ingested_before: float) -> Compacted:
        result = self._call("compact", lambda: self.backend.compact(before_day, ingested_before))
        self.metrics.compacted.inc(result.events)
        return result

    def record(self, predictions: Sequence[Prediction]) -> Appended:
        return self._call("record", lambda: self.backend.record(predictions))

    # the outcome job's calls share one operation label: they run together, once per round
    def event_clock(self) -> int | None:
        return self._call("outcomes", self.backend.event_clock)

    def due(self, matured_by: int, limit: int) -> list[Prediction]:
        return self._call("outcomes", lambda: self.backend.due(matured_by, limit))

    def settle(self, settled: Sequence[Prediction]) -> None:
        self._call("outcomes", lambda: self.backend.settle(settled))

    def settled(self, matured_after: int, matured_by: int) -> Settled:
        return self._call("outcomes", lambda: self.backend.settled(matured_after, matured_by))

    def backlog(self, overdue_by: int) -> Backlog:
        return self._call("outcomes", lambda: self.backend.backlog(overdue_by))

    def prune(self, settled_before: int, recorded_before: float) -> int:
        return self._call("outcomes", lambda: self.backend.prune(settled_before, recorded_before))

    def ping(self) -> None:
        self._call("ping", self.backend.ping)

    def close(self) -> None:
        try:
            self.backend.close()
        except _DOWN:
            logger.warning("event store did not close cleanly", exc_info=True)
