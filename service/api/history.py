"""Users sent without ``events``: their history comes from the event store.

The one call the prediction path makes is :func:`resolve_columns`. With every user's events inline
it is :func:`service.scoring.to_columns` and nothing else (no store is touched, no behaviour
changes). Otherwise it reads all the missing histories in one store call, which blocks: on the
event loop it raises :class:`StoreReadNeeded` instead, and the handler runs the request in a
worker thread.

A stored history that was compacted holds counters for purchases older than the retention
horizon; they are exact for any ``as_of`` whose window starts after the newest folded purchase
(always the case for ``as_of`` = now). An ``as_of`` earlier than that is a 422
``history_compacted``, never a silently different score.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np

from service.api.deps import AppContext
from service.errors import (
    HistoryCompactedError,
    InvalidInputError,
    StoreUnavailableError,
    UnknownUserError,
)
from service.features import SECONDS_PER_DAY, FeatureSpec, FoldedHistory
from service.lifecycle import Served
from service.limits import RETRY_AFTER
from service.schemas import ErrorItem, PredictRequest
from service.scoring import EventColumns, to_columns
from service.store import History, StoreDownError

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
        return to_columns(users, now)
    store = ctx.store
    if store is None:
        raise InvalidInputError(
            "events are required: no event store is configured (PI_STORE_BACKEND=none)",
            [ErrorItem(field=f"{field(i)}events", type="missing", message="Field required") for i in missing][
                :_MAX_LISTED
            ],
        )
    if _on_event_loop():
        raise StoreReadNeeded
    try:
        stored = store.histories([users[i].user_id for i in missing])
    except StoreDownError as exc:
        raise StoreUnavailableError(f"{exc}; retry after Retry-After seconds", headers=RETRY_AFTER) from None
    unknown = [i for i in missing if users[i].user_id not in stored]
    if unknown and ctx.settings.store_unknown_user == "reject":
        raise UnknownUserError(
            f"{len(unknown)} user(s) sent without events have no stored history",
            [
                ErrorItem(field=f"{field(i)}user_id", type="unknown_user", message="no stored history")
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
    cols = to_columns(inline, now)
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
                ErrorItem(
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
