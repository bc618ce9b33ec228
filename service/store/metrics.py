"""The event store's metrics, on the registry the service's :class:`service.metrics.Metrics` uses."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.metrics import PREFIX

#: The store operations, a closed label set.
OPERATIONS: tuple[str, ...] = ("read", "write", "list", "erase", "compact", "ping", "record", "outcomes")


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry, *, latency_buckets: Sequence[float]) -> None:
        p = PREFIX
        self.duration = Histogram(
            f"{p}_store_operation_duration_seconds",
            "Event store call time by operation (read: histories for one prediction request, "
            "write: one POST /events transaction, durable when it returns; record: one batch of "
            "served predictions kept for their outcome; outcomes: the outcome job's calls).",
            ["operation"],
            buckets=latency_buckets,
            registry=registry,
        )
        self.errors = Counter(
            f"{p}_store_errors",
            "Event store calls that failed (store down, timeout, disk error), by operation.",
            ["operation"],
            registry=registry,
        )
        for operation in OPERATIONS:
            self.duration.labels(operation)
            self.errors.labels(operation)
        self.ingested = Counter(
            f"{p}_events_ingested", "Events newly stored by POST /events.", registry=registry
        )
        self.duplicates = Counter(
            f"{p}_events_duplicate",
            "Events POST /events acknowledged without storing them again (event id or content seen).",
            registry=registry,
        )
        self.compacted = Counter(
            f"{p}_events_compacted",
            "Raw events folded into per-user counters by compaction.",
            registry=registry,
        )
        self.up = Gauge(
            f"{p}_store_up", "1 when the last event store call or health check succeeded.", registry=registry
        )
