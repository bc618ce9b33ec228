"""Users sent without ``events``: their history comes from the event store.

:func:`resolve_columns` is the prediction path's one call. With every user's events inline it is
:func:`service.scoring.to_columns` and nothing else. Otherwise it reads the missing histories in
one store call, which blocks: on the event loop it raises :class:`StoreReadNeeded` instead and the
handler moves the request to a worker thread; ``/predict`` by id shares reads (:class:`HistoryReads`).
Compacted counters are exact only for an ``as_of`` whose window starts after the newest folded
purchase (always so for ``as_of`` = now); an earlier one is a 422 ``history_compacted``, never a
silently different score.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import anyio
import numpy as np

from service.api.columns import request_columns
from service.api.deps import AppContext
from service.columns import EventColumns, FoldedHistory
from service.errors import (
    ErrorDetail,
    HistoryCompactedError,
    InvalidInputError,
    StoreUnavailableError,
    UnknownUserError,
)
from service.features import SECONDS_PER_DAY, FeatureSpec
from service.lifecycle import Served
from service.schemas import PredictRequest
from service.store import GuardedStore, History, StoreDownError

_MAX_LISTED = 10
_EMPTY = History([], [], [], None)


class StoreReadNeeded(Exception):  # noqa: N818 - a signal to the handler, not an error
    """Raised on the event loop when a request needs the store: rerun it in a worker thread."""


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def resolve_columns(
    ctx: AppContext,
    served: Served,
    users: Sequence[PredictRequest],
    now: int,
    field: Callable[[int], str],
) -> EventColumns:
    """Columns for ``users``: inline events as sent, stored histories for users without ``events``.

    ``field(i)`` names user ``i`` in error details (``""`` for a single user, ``"users[3]."``).
    """
    missing = [i for i, u in enumerate(users) if u.events is None]
    if not missing:
        return request_columns(users, now)
    store = ctx.store
    if store is None:
        raise InvalidInputError(
            "events are required: no event store is configured (PI_STORE_BACKEND=none)",
            [
                ErrorDetail(field=f"{field(i)}events", type="missing", message="Field required")
                for i in missing
            ][:_MAX_LISTED],
        )
    if _on_event_loop():
        raise StoreReadNeeded
    try:
        stored = store.histories([users[i].user_id for i in missing])
    except StoreDownError as exc:
        raise _unavailable(exc) from None
    return with_stored(ctx, served, users, now, stored, field)


def _unavailable(exc: StoreDownError) -> StoreUnavailableError:
    return StoreUnavailableError.retry_later(str(exc))


def with_stored(
    ctx: AppContext,
    served: Served,
    users: Sequence[PredictRequest],
    now: int,
    stored: dict[str, History],
    field: Callable[[int], str],
) -> EventColumns:
    """Columns for ``users`` once the histories of those without ``events`` were read: the
    unknown-user policy, the compaction check, inline and stored events side by side."""
    missing = [i for i, u in enumerate(users) if u.events is None]
    unknown = [i for i in missing if users[i].user_id not in stored]
    if unknown and ctx.settings.store_unknown_user == "reject":
        raise UnknownUserError(
            f"{len(unknown)} user(s) sent without events have no stored history",
            [
                ErrorDetail(field=f"{field(i)}user_id", type="unknown_user", message="no stored history")
                for i in unknown
            ][:_MAX_LISTED],
        )
    return _merge(users, now, stored, served.predictor.metadata.feature_spec, field)


def _merge(
    users: Sequence[PredictRequest],
    now: int,
    stored: dict[str, History],
    spec: FeatureSpec,
    field: Callable[[int], str],
) -> EventColumns:
    inline = [u for u in users if u.events is not None]
    cols = request_columns(inline, now)
    n = len(users)
    ts_parts: list[np.ndarray] = []
    amount_parts: list[np.ndarray] = []
    quantity_parts: list[np.ndarray] = []
    counts = np.zeros(n, dtype=np.int64)
    as_of = np.zeros(n, dtype=np.int64)
    f_days, f_first, f_last = (np.zeros(n, dtype=np.int64) for _ in range(3))
    f_amount, f_quantity = np.zeros(n), np.zeros(n)
    too_early: list[int] = []
    window_days = spec.lookback_bins * spec.bin_days
    j = 0  # position among the inline users
    for i, user in enumerate(users):
        if user.events is not None:
            lo, hi = int(cols.offsets[j]), int(cols.offsets[j + 1])
            ts_parts.append(cols.timestamps[lo:hi])
            amount_parts.append(cols.amounts[lo:hi])
            quantity_parts.append(cols.quantities[lo:hi])
            counts[i], as_of[i] = hi - lo, cols.as_of[j]
            j += 1
            continue
        history = stored.get(user.user_id, _EMPTY)
        # the same rule as to_columns: float epoch seconds, floored
        as_of[i] = now if user.as_of is None else int(np.floor(user.as_of.timestamp()))
        ts_parts.append(np.asarray(history.timestamps, dtype=np.int64))
        amount_parts.append(np.asarray(history.amounts, dtype=np.float64))
        quantity_parts.append(np.asarray(history.quantities, dtype=np.float64))
        counts[i] = len(history.timestamps)
        folded = history.folded
        if folded is not None:
            if folded.last_day > as_of[i] // SECONDS_PER_DAY - window_days:
                too_early.append(i)
            f_days[i], f_first[i], f_last[i] = folded.purchase_days, folded.first_day, folded.last_day
            f_amount[i], f_quantity[i] = folded.total_amount, folded.total_quantity
    if too_early:
        raise HistoryCompactedError(
            "as_of is too early for the stored history: purchases before the retention horizon "
            "were compacted; send the events inline to score at that date",
            [
                ErrorDetail(
                    field=f"{field(i)}as_of", type="history_compacted", message="before the stored window"
                )
                for i in too_early
            ][:_MAX_LISTED],
        )
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return EventColumns(
        timestamps=np.concatenate(ts_parts) if ts_parts else np.zeros(0, dtype=np.int64),
        amounts=np.concatenate(amount_parts) if amount_parts else np.zeros(0),
        quantities=np.concatenate(quantity_parts) if quantity_parts else np.zeros(0),
        offsets=offsets,
        as_of=as_of,
        folded=FoldedHistory(f_days, f_first, f_last, f_amount, f_quantity) if f_days.any() else None,
    )


class HistoryReads:
    """Concurrent ``/predict`` requests by user id share one store read.

    A store read blocks, so it runs in a worker thread, and a thread hop plus one SQL statement (or
    Redis pipeline) for every request would dominate the by-id path. Here the ids queue up on the
    event loop and one consumer reads all of those queued in one call; while that read runs, the
    next requests queue, so the batch grows with the load and an idle queue never waits. Each
    waiter gets its own user's history (``None``: not stored) or the failure.
    """

    def __init__(self, store: GuardedStore, limiter: anyio.CapacityLimiter, *, max_users: int) -> None:
        self._store = store
        self._limiter = limiter
        self._max_users = max_users
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[History | None]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Create the queue and the consumer; call inside the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="history-reads")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _fail(
                [self._queue.get_nowait()],
                StoreUnavailableError("the service is shutting down"),
            )

    async def read(self, user_id: str) -> History | None:
        if self._queue is None or self._task is None or self._task.done():
            raise StoreUnavailableError("the store reader is not running")
        future: asyncio.Future[History | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((user_id, future))
        return await future

    async def _consume(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < self._max_users:
                batch.append(queue.get_nowait())
            waiting = [(user_id, future) for user_id, future in batch if not future.done()]
            if not waiting:
                continue
            ids = list(dict.fromkeys(user_id for user_id, _ in waiting))
            try:
                stored = await anyio.to_thread.run_sync(self._store.histories, ids, limiter=self._limiter)
            except asyncio.CancelledError:
                _fail(waiting, StoreUnavailableError("the service is shutting down"))
                raise
            except StoreDownError as exc:
                _fail(waiting, _unavailable(exc))
                continue
            except Exception as exc:  # every waiter of this read gets the failure, nobody hangs
                _fail(waiting, exc)
                continue
            for user_id, future in waiting:
                if not future.done():
                    future.set_result(stored.get(user_id))


def _fail(waiting: Sequence[tuple[str, asyncio.Future[History | None]]], error: Exception) -> None:
    for _, future in waiting:
        if not future.done():
            future.set_exception(error)
