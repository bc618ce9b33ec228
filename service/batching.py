"""Adaptive micro-batching: concurrent ``/predict`` calls share one encode + inference call.

Each request is parsed and validated on its own (a bad request fails alone); its columns then join
a bounded queue, and a full queue refuses at once (:class:`QueueFullError`) rather than let the
wait grow with the load. A request that finds no company is scored at once (the wait bound is a
cap, not a delay); while requests keep arriving they are gathered up to ``max_users``,
``max_wait_s`` or a few idle turns of the loop, then scored on the loop (cheaper than a thread hop
for a gathered batch) in one call per model, so an answer names the version that computed it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.columns import EventColumns, concat_columns
from service.gather import Gatherer, Waiter, fail, resolve
from service.lifecycle import LoadedModel
from service.metrics import ArrayHistogram

#: ``(model, columns) -> float32 [n_users]``: what one gathered batch is handed to.
Score = Callable[[LoadedModel, EventColumns], NDArray[np.float32]]

#: Turns of the event loop without a new arrival after which a busy batch stops gathering: a
#: request whose bytes have arrived needs about two turns (read, then parse) to reach the queue,
#: and in a closed loop every client may already be waiting in this batch.
_IDLE_TURNS = 2


class QueueFullError(RuntimeError):
    """The batch queue is at its bound: the request is shed, not queued."""


class BatcherStoppedError(RuntimeError):
    """The batcher stopped (shutdown) before this request was scored."""


@dataclass(frozen=True)
class _Job:
    served: LoadedModel
    columns: EventColumns
    enqueued: float  # perf_counter


_Waiter = Waiter[_Job, NDArray[np.float32]]


class Batcher(Gatherer[_Job, NDArray[np.float32]]):
    """Gathers concurrent requests' columns and scores them together; see the module docstring."""

    task_name = "micro-batcher"
    not_running = "the batcher is not running"

    def __init__(
        self,
        score: Score,
        *,
        max_users: int,
        max_wait_s: float,
        max_queue: int,
        queue_wait: ArrayHistogram | None = None,
    ) -> None:
        super().__init__(max_queue=max_queue)
        self._score = score
        self._max_users = max_users
        self._max_wait_s = max_wait_s
        self._queue_wait = queue_wait

    def _stopped(self, message: str) -> Exception:
        return BatcherStoppedError(message)

    async def submit(self, served: LoadedModel, columns: EventColumns) -> NDArray[np.float32]:
        """Score ``columns`` on ``served`` as part of a batch: ``float32 [columns.n_users]``.

        Raises :class:`QueueFullError` at once when the queue is full, or whatever scoring raised.
        """
        try:
            future = self._enqueue(_Job(served, columns, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self._max_queue} requests are already waiting for the model") from None
        return await future

    async def _gather(self, queue: asyncio.Queue[_Waiter], batch: list[_Waiter]) -> None:
        loop = asyncio.get_running_loop()
        users = batch[0].request.columns.n_users
        deadline = loop.time() + self._max_wait_s
        idle_turns = 0
        while users < self._max_users:
            if not queue.empty():
                waiter = queue.get_nowait()
                batch.append(waiter)
                users += waiter.request.columns.n_users
                idle_turns = 0
                continue
            # Alone: go now (no added latency). In company: others are likely on their way.
            if len(batch) == 1 or idle_turns >= _IDLE_TURNS or loop.time() >= deadline:
                break
            await asyncio.sleep(0)
            idle_turns += 1

    async def _answer(self, batch: list[_Waiter]) -> None:
        started = time.perf_counter()
        if self._queue_wait is not None:
            self._queue_wait.observe_many([started - waiter.request.enqueued for waiter in batch])
        # One call per model: after a hot swap, queued requests keep the model they started on.
        groups: dict[int, list[_Waiter]] = {}
        for waiter in batch:
            groups.setdefault(id(waiter.request.served), []).append(waiter)
        for waiters in groups.values():
            jobs = [w.request for w in waiters]
            try:
                probabilities = self._score(jobs[0].served, concat_columns([j.columns for j in jobs]))
            except Exception as exc:  # every waiter of this call gets the failure, nobody hangs
                fail(waiters, exc)
                continue
            start = 0
            for waiter in waiters:
                end = start + waiter.request.columns.n_users
                resolve(waiter, probabilities[start:end])
                start = end
