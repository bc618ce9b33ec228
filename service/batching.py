"""Adaptive micro-batching: concurrent ``/predict`` calls share one encode + inference call.

Each request is parsed and validated on its own (a bad request fails alone), then its columns
join a bounded queue; a full queue refuses at once (:class:`QueueFullError`) rather than grow a
wait with the load. One consumer task scores what is queued: an item that finds no company goes at
once (the wait bound is a cap, not a delay; triton#4667), and while requests keep arriving it
gathers them up to ``max_users``, ``max_wait_s`` or a few idle turns of the loop. It scores on the
loop, where a gathered batch costs less than a thread hop; one call per model, so an answer names
the version that computed it, and results *and* exceptions reach every waiter (MLServer's batcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from service.columns import EventColumns, concat_columns
from service.lifecycle import Served
from service.metrics import ArrayHistogram

logger = logging.getLogger(__name__)

#: ``(model, columns) -> float32 [n_users]``: what one gathered batch is handed to.
Score = Callable[[Served, EventColumns], NDArray[np.float32]]

#: Turns of the event loop without a new arrival after which a busy batch stops gathering: a
#: request whose bytes have arrived needs about two turns (read, then parse) to reach the queue,
#: and in a closed loop every client may already be waiting in this batch.
_IDLE_TURNS = 2


class QueueFullError(RuntimeError):
    """The batch queue is at its bound: the request is shed, not queued."""


class BatcherStoppedError(RuntimeError):
    """The batcher stopped (shutdown) before this request was scored."""


@dataclass
class _Item:
    served: Served
    columns: EventColumns
    future: asyncio.Future[NDArray[np.float32]]
    enqueued: float  # perf_counter


class Batcher:
    """Gathers concurrent requests' columns and scores them together; see the module docstring."""

    def __init__(
        self,
        score: Score,
        *,
        max_users: int,
        max_wait_s: float,
        max_queue: int,
        queue_wait: ArrayHistogram | None = None,
    ) -> None:
        self._score = score
        self._max_users = max_users
        self._max_wait_s = max_wait_s
        self._max_queue = max_queue
        self._queue_wait = queue_wait
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Create the queue and the consumer task; call inside the running event loop."""
        self._queue = asyncio.Queue(self._max_queue)
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the consumer; requests still queued get :class:`BatcherStoppedError`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(BatcherStoppedError("the service is shutting down"))

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, served: Served, columns: EventColumns) -> NDArray[np.float32]:
        """Score ``columns`` on ``served`` as part of a batch: ``float32 [columns.n_users]``.

        Raises :class:`QueueFullError` at once when the queue is full, or whatever scoring raised.
        """
        if self._queue is None or self._task is None or self._task.done():
            raise BatcherStoppedError("the batcher is not running")
        future: asyncio.Future[NDArray[np.float32]] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(served, columns, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self._max_queue} requests are already waiting for the model") from None
        return await future

    async def _consume(self) -> None:
        queue = self._queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            users = batch[0].columns.n_users
            deadline = loop.time() + self._max_wait_s
            idle_turns = 0
            while users < self._max_users:
                if not queue.empty():
                    item = queue.get_nowait()
                    batch.append(item)
                    users += item.columns.n_users
                    idle_turns = 0
                    continue
                # Alone: go now (no added latency). In company: others are likely on their way.
                if len(batch) == 1 or idle_turns >= _IDLE_TURNS or loop.time() >= deadline:
                    break
                await asyncio.sleep(0)
                idle_turns += 1
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        live = [item for item in batch if not item.future.done()]  # a cancelled waiter is skipped
        if self._queue_wait is not None and live:
            self._queue_wait.observe_many([started - item.enqueued for item in live])
        # One call per model: after a hot swap, queued requests keep the model they started on.
        groups: dict[int, list[_Item]] = {}
        for item in live:
            groups.setdefault(id(item.served), []).append(item)
        for items in groups.values():
            try:
                probabilities = self._score(items[0].served, concat_columns([i.columns for i in items]))
            except Exception as exc:  # every waiter of this call gets the failure, nobody hangs
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            start = 0
            for item in items:
                end = start + item.columns.n_users
                if not item.future.done():
                    item.future.set_result(probabilities[start:end])
                start = end
