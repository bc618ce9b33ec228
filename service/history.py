"""Users sent without ``events``: their stored histories, merged into a request's columns.

The caller picks how the store is read, because a read blocks: :func:`read_histories` in a worker
thread, or :class:`HistoryReads` on the event loop, where concurrent requests share one read.
:func:`merge_histories` then applies the unknown-user policy and the compaction rule: counters
of compacted purchases are exact only for an ``as_of`` whose window starts after the newest folded
purchase (always so for ``as_of`` = now); an earlier one is a 422 ``history_compacted``, never a
silently different score.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.to_thread
import numpy as np

from service.columns import EventColumns, Folded, FoldedHistory
from service.errors import (
    ErrorDetail,
    HistoryCompactedError,
    StoreUnavailableError,
    UnknownUserError,
)
from service.features import SECONDS_PER_DAY, FeatureSpec
from service.gather import Gatherer, Waiter, fail, resolve
from service.store import GuardedStore, History, StoreDownError

_MAX_LISTED = 10
_EMPTY = History([], [], [], None)


@dataclass(frozen=True)
class StoredUsers:
    """The users of a request sent without events: where each sits among all its users (ascending),
    its id, and the ``as_of`` it is scored at (epoch seconds)."""

    positions: list[int]
    user_ids: list[str]
    as_of: list[int]


def read_histories(store: GuardedStore, user_ids: Sequence[str]) -> dict[str, History]:
    """One store read for every user in ``user_ids``; blocks, so call it from a worker thread."""
    try:
        return store.histories(user_ids)
    except StoreDownError as exc:
        raise _unavailable(exc) from None


def _unavailable(exc: StoreDownError) -> StoreUnavailableError:
    return StoreUnavailableError.retry_later(str(exc))


def merge_histories(
    inline: EventColumns,
    by_id: StoredUsers,
    stored: dict[str, History],
    *,
    spec: FeatureSpec,
    reject_unknown: bool,
    field: Callable[[int], str],
) -> EventColumns:
    """Every user's columns in request order: ``inline`` holds those sent with events (in order),
    ``stored`` the histories read for ``by_id`` (an unknown user is absent).

    ``field(i)`` names user ``i`` in error details (``""`` for a single user, ``"users[3]."``).
    """
    unknown = [p for p, user_id in zip(by_id.positions, by_id.user_ids, strict=True) if user_id not in stored]
    if unknown and reject_unknown:
        raise UnknownUserError(
            f"{len(unknown)} user(s) sent without events have no stored history",
            [
                ErrorDetail(field=f"{field(i)}user_id", type="unknown_user", message="no stored history")
                for i in unknown
            ][:_MAX_LISTED],
        )
    n = inline.n_users + len(by_id.positions)
    stored_at = {position: k for k, position in enumerate(by_id.positions)}
    ts_parts: list[np.ndarray] = []
    amount_parts: list[np.ndarray] = []
    quantity_parts: list[np.ndarray] = []
    counts = np.zeros(n, dtype=np.int64)
    as_of = np.zeros(n, dtype=np.int64)
    folded_rows: list[Folded | None] = [None] * n
    too_early: list[int] = []
    window_days = spec.lookback_bins * spec.bin_days
    j = 0  # position among the inline users
    for i in range(n):
        k = stored_at.get(i)
        if k is None:
            lo, hi = int(inline.offsets[j]), int(inline.offsets[j + 1])
            ts_parts.append(inline.timestamps[lo:hi])
            amount_parts.append(inline.amounts[lo:hi])
            quantity_parts.append(inline.quantities[lo:hi])
            counts[i], as_of[i] = hi - lo, inline.as_of[j]
            j += 1
            continue
        history = stored.get(by_id.user_ids[k], _EMPTY)
        as_of[i] = by_id.as_of[k]
        ts_parts.append(np.asarray(history.timestamps, dtype=np.int64))
        amount_parts.append(np.asarray(history.amounts, dtype=np.float64))
        quantity_parts.append(np.asarray(history.quantities, dtype=np.float64))
        counts[i] = len(history.timestamps)
        folded = history.folded
        if folded is not None:
            if folded.last_day > as_of[i] // SECONDS_PER_DAY - window_days:
                too_early.append(i)
            folded_rows[i] = folded
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
        folded=FoldedHistory.from_rows(folded_rows),
    )


_Read = Waiter[str, History | None]


class HistoryReads(Gatherer[str, History | None]):
    """Concurrent ``/predict`` requests by user id share one store read.

    A store read blocks, so it runs in a worker thread, and a thread hop plus one SQL statement (or
    Redis pipeline) for every request would dominate the by-id path. Here the ids queue up on the
    event loop and one consumer reads all of those queued in one call; while that read runs, the
    next requests queue, so the batch grows with the load and an idle queue never waits. Each
    waiter gets its own user's history (``None``: not stored) or the failure.
    """

    task_name = "history-reads"
    not_running = "the store reader is not running"

    def __init__(self, store: GuardedStore, limiter: anyio.CapacityLimiter, *, max_users: int) -> None:
        super().__init__()
        self._store = store
        self._limiter = limiter
        self._max_users = max_users

    def _stopped(self, message: str) -> Exception:
        return StoreUnavailableError(message)

    async def read(self, user_id: str) -> History | None:
        return await self._enqueue(user_id)

    async def _gather(self, queue: asyncio.Queue[_Read], batch: list[_Read]) -> None:
        while not queue.empty() and len(batch) < self._max_users:
            batch.append(queue.get_nowait())

    async def _answer(self, batch: list[_Read]) -> None:
        ids = list(dict.fromkeys(waiter.request for waiter in batch))
        try:
            stored = await anyio.to_thread.run_sync(self._store.histories, ids, limiter=self._limiter)
        except StoreDownError as exc:
            fail(batch, _unavailable(exc))
            return
        for waiter in batch:
            resolve(waiter, stored.get(waiter.request))
