"""The online event store: per-user purchase histories that ``/predict`` reads by user id.

One protocol (:class:`EventStore`, synchronous: callers run it in worker threads, never on the
event loop), two implementations: embedded SQLite (the default, one file, WAL) and Redis (shared by
several replicas). :class:`GuardedStore` wraps either with timing, error counting and a health
flag. Nothing here knows about HTTP.
"""

from __future__ import annotations

from service.store.base import (
    Appended,
    Compacted,
    EventStore,
    History,
    NewEvent,
    Page,
    StoredEvent,
    StoreDownError,
    content_key,
    event_id_of,
    event_key,
)
from service.store.guard import GuardedStore, open_store

__all__ = [
    "Appended",
    "Compacted",
    "EventStore",
    "GuardedStore",
    "History",
    "NewEvent",
    "Page",
    "StoreDownError",
    "StoredEvent",
    "content_key",
    "event_id_of",
    "event_key",
    "open_store",
]
