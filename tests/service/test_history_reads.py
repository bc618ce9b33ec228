"""Gathered store reads for predictions by user id: concurrent reads share one store call, an
idle read goes at once, each waiter gets its own user's history, failures reach every waiter."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import anyio
import pytest
from prometheus_client import CollectorRegistry

from service.errors import StoreUnavailableError
from service.history import HistoryReads
from service.store import GuardedStore, History, StoreDownError
from service.store.metrics import StoreMetrics


class _Backend:
    """Answers ``histories`` from a dict, records each call; ``gate`` holds a call in progress."""

    backend = "fake"

    def __init__(self, known: dict[str, History]) -> None:
        self.known = known
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.down = False

    def histories(self, user_ids: Sequence[str]) -> dict[str, History]:
        self.calls.append(list(user_ids))
        assert self.gate.wait(10), "test gate never opened"
        if self.down:
            raise StoreDownError("fake store is down")
        return {u: self.known[u] for u in user_ids if u in self.known}


def _history(n: int) -> History:
    return History([1_000 * k for k in range(n)], [1.0] * n, [1] * n, None)


def _reads(backend: _Backend) -> HistoryReads:
    guarded = GuardedStore(backend, StoreMetrics(CollectorRegistry(), latency_buckets=(1.0,)))  # type: ignore[arg-type]
    return HistoryReads(guarded, anyio.CapacityLimiter(2), max_users=4)


def test_an_idle_read_goes_at_once_and_unknown_users_get_none() -> None:
    backend = _Backend({"a": _history(2)})

    async def scenario() -> tuple[History | None, History | None]:
        reads = _reads(backend)
        reads.start()
        try:
            return await reads.read("a"), await reads.read("nobody")
        finally:
            await reads.stop()

    a, nobody = asyncio.run(scenario())
    assert a == _history(2)
    assert nobody is None
    assert backend.calls == [["a"], ["nobody"]]


def test_reads_that_arrive_during_a_read_share_the_next_call_capped_at_max_users() -> None:
    backend = _Backend({f"u{i}": _history(i) for i in range(10)})

    async def scenario() -> list[History | None]:
        reads = _reads(backend)
        reads.start()
        try:
            backend.gate.clear()
            first = asyncio.ensure_future(reads.read("u0"))
            while not backend.calls:  # the first read is in its worker thread, held by the gate
                await asyncio.sleep(0.01)
            rest = [asyncio.ensure_future(reads.read(f"u{i}")) for i in (1, 2, 3, 4, 5, 1)]
            await asyncio.sleep(0)  # one turn of the loop: each read queues its id in its first step
            backend.gate.set()
            return await asyncio.gather(first, *rest)
        finally:
            await reads.stop()

    got = asyncio.run(scenario())
    assert got == [_history(i) for i in (0, 1, 2, 3, 4, 5, 1)]  # each waiter its own user
    assert backend.calls[0] == ["u0"]
    assert backend.calls[1] == ["u1", "u2", "u3", "u4"]  # max_users waiters; ids read once
    assert backend.calls[2] == ["u5", "u1"]


def test_a_store_failure_reaches_every_waiter_of_that_read_and_the_next_read_works() -> None:
    backend = _Backend({"a": _history(1)})

    async def scenario() -> list[object]:
        reads = _reads(backend)
        reads.start()
        try:
            backend.down = True
            failed = await asyncio.gather(reads.read("a"), reads.read("b"), return_exceptions=True)
            backend.down = False
            return [*failed, await reads.read("a")]
        finally:
            await reads.stop()

    first, second, recovered = asyncio.run(scenario())
    assert isinstance(first, StoreUnavailableError)
    assert isinstance(second, StoreUnavailableError)
    assert first.headers == {"Retry-After": "1"}
    assert recovered == _history(1)


def test_reads_after_stop_are_refused_not_hung() -> None:
    async def scenario() -> None:
        reads = _reads(_Backend({}))
        reads.start()
        await reads.stop()
        with pytest.raises(StoreUnavailableError):
            await reads.read("a")

    asyncio.run(scenario())


def test_a_read_cut_short_by_shutdown_is_a_503_to_retry() -> None:
    backend = _Backend({"a": _history(1)})
    backend.gate.clear()

    async def scenario() -> object:
        reads = _reads(backend)
        reads.start()
        read = asyncio.create_task(reads.read("a"))
        while not backend.calls:  # the store call is in progress
            await asyncio.sleep(0.001)
        stopping = asyncio.create_task(reads.stop())
        await asyncio.sleep(0.01)
        backend.gate.set()
        await stopping
        return (await asyncio.gather(read, return_exceptions=True))[0]

    failed = asyncio.run(scenario())
    assert isinstance(failed, StoreUnavailableError)
    assert failed.message == "the service is shutting down"
    assert failed.headers == {"Retry-After": "1"}
