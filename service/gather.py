"""Requests that queue on the event loop and are answered together by one consumer task.

:class:`Gatherer` is the lifecycle the micro-batcher and the shared store reads have in common:
the queue and the consumer are created inside the running loop, stopping cancels the consumer and
fails every waiter, and a batch's results *and* exceptions reach every waiter, so nobody hangs.
A subclass says how a batch is gathered and how it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

K = TypeVar("K")
R = TypeVar("R")


@dataclass
class Waiter(Generic[K, R]):
    """One queued request and the future its caller awaits."""

    request: K
    future: asyncio.Future[R]


def fail(waiters: Sequence[Waiter[K, R]], error: BaseException) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            waiter.future.set_exception(error)


def resolve(waiter: Waiter[K, R], result: R) -> None:
    if not waiter.future.done():  # a cancelled waiter is skipped
        waiter.future.set_result(result)


class Gatherer(ABC, Generic[K, R]):
    """Queue of :class:`Waiter` and its one consumer; see the module docstring."""

    task_name: ClassVar[str]
    not_running: ClassVar[str]  # the message of a request made while stopped

    def __init__(self, *, max_queue: int = 0) -> None:
        self._max_queue = max_queue  # 0: unbounded
        self._queue: asyncio.Queue[Waiter[K, R]] | None = None
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    def _stopped(self, message: str) -> Exception:
        """What a waiter gets when the gatherer is not running or stops before answering it."""

    @abstractmethod
    async def _gather(self, queue: asyncio.Queue[Waiter[K, R]], batch: list[Waiter[K, R]]) -> None:
        """Extend ``batch`` (its first waiter is in) from ``queue``: the batching rule."""

    @abstractmethod
    async def _answer(self, batch: list[Waiter[K, R]]) -> None:
        """Resolve or fail every waiter of ``batch`` (none is done yet)."""

    def start(self) -> None:
        """Create the queue and the consumer task; call inside the running event loop."""
        self._queue = asyncio.Queue(self._max_queue)
        self._task = asyncio.get_running_loop().create_task(self._consume(), name=self.task_name)

    async def stop(self) -> None:
        """Stop the consumer; every request not answered yet gets :meth:`_stopped`'s error."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            fail([self._queue.get_nowait()], self._stopped("the service is shutting down"))

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def _enqueue(self, request: K) -> asyncio.Future[R]:
        """Queue ``request``; raises :class:`asyncio.QueueFull` when a bounded queue is full."""
        if self._queue is None or self._task is None or self._task.done():
            raise self._stopped(self.not_running)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Waiter(request, future))
        return future

    async def _consume(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            try:
                await self._gather(queue, batch)
                live = [waiter for waiter in batch if not waiter.future.done()]
                if live:
                    await self._answer(live)
            except asyncio.CancelledError:
                fail(batch, self._stopped("the service is shutting down"))
                raise
            except Exception as exc:  # every waiter of this batch gets the failure, nobody hangs
                fail(batch, exc)
