"""The online event store: per-user purchase histories that ``/predict`` reads by user id.

One protocol (:class:`EventStore`, synchronous: callers run it in worker threads, never on the
event loop), two implementations: embedded SQLite (the default, one file, WAL) and Redis (shared by
several replicas). :class:`GuardedStore` wraps either with timing, error counting and a health
flag. Nothing here knows about HTTP.
"""

from __future__ import annotations

from service.store.base import (
    COMPACTED,
    UNOBSERVED,
    Appended,
    Backlog,
    Compacted,
    EventStore,
    History,
    NewEvent,
    OutcomeStore,
    Page,
    Prediction,
    Settled,
    StoredEvent,
    StoreDownError,
    content_key,
    event_id_of,
    event_key,
)
from service.store.guard import GuardedStore, open_store

__all__ = [
    "COMPACTED",
    "UNOBSERVED",
    "Appended",
    "Backlog",
    "Compacted",
    "EventStore",
    "GuardedStore",
    "History",
    "NewEvent",
    "OutcomeStore",
    "Page",
    "Prediction",
    "Settled",
    "StoreDownError",
    "StoredEvent",
    "content_key",
    "event_id_of",
    "event_key",
    "open_store",
]
