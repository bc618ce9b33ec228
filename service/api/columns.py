"""Parsed prediction requests -> checked columns: the request models stop at this edge.

Inline events are flattened here; users sent without ``events`` are handed to
:mod:`service.history` by id and ``as_of``, and their stored histories merged in request order.
The limits and the timestamp range are checked here too, with errors that name fields as the
client sent them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from service.api.deps import AppContext
from service.auth import require_inline, require_stored
from service.columns import EventColumns, out_of_range
from service.errors import ErrorDetail, InvalidInputError, too_many_events
from service.history import StoredUsers, merge_histories, read_histories
from service.lifecycle import LoadedModel
from service.schemas import PredictRequest
from service.store import History
from service.timestamps import RANGE_MESSAGE, epoch_seconds

_MAX_LISTED = 10  # users named in one error; the count says the rest
_MAX_FIELDS = 100  # timestamps named in one out-of-range error


class StoreReadNeeded(Exception):  # noqa: N818 - a signal to the handler, not an error
    """A handler that may not block needs the store: rerun it in a worker thread."""


def resolve_columns(
    ctx: AppContext,
    served: LoadedModel,
    users: Sequence[PredictRequest],
    now: int,
    field: Callable[[int], str],
    *,
    may_block: bool,
) -> EventColumns:
    """Columns for ``users``: inline events as sent, stored histories for users without ``events``,
    read here when ``may_block`` (a worker thread); else :class:`StoreReadNeeded` if one is needed.

    ``field(i)`` names user ``i`` in error details (``""`` for a single user, ``"users[3]."``).
    """
    missing = [i for i, u in enumerate(users) if u.events is None]
    if len(missing) < len(users):
        require_inline()
    if not missing:
        return request_columns(users, now)
    store = ctx.store
    if store is None:
        raise InvalidInputError(
            "events are required: no event store is configured (PI_STORE_BACKEND=none)",
            [ErrorDetail(f"{field(i)}events", "missing", "Field required") for i in missing][:_MAX_LISTED],
        )
    require_stored()
    if not may_block:
        raise StoreReadNeeded
    stored = read_histories(store, [users[i].user_id for i in missing])
    return with_stored(ctx, served, users, now, stored, field)


def with_stored(
    ctx: AppContext,
    served: LoadedModel,
    users: Sequence[PredictRequest],
    now: int,
    stored: dict[str, History],
    field: Callable[[int], str],
) -> EventColumns:
    """Columns for ``users`` once the histories of those without ``events`` were read."""
    by_id = [i for i, u in enumerate(users) if u.events is None]
    merged = merge_histories(
        request_columns([u for u in users if u.events is not None], now),
        StoredUsers(
            positions=by_id,
            user_ids=[users[i].user_id for i in by_id],
            # the same rule as request_columns: float epoch seconds, floored
            as_of=[now if (t := users[i].as_of) is None else math.floor(t.timestamp()) for i in by_id],
        ),
        stored,
        spec=served.predictor.metadata.feature_spec,
        reject_unknown=ctx.settings.store_unknown_user == "reject",
        field=field,
    )
    return dataclasses.replace(merged, user_ids=[u.user_id for u in users])


def request_columns(users: Sequence[PredictRequest], now: int) -> EventColumns:
    """Flatten validated users into columns; ``now`` (epoch seconds) stands in for a missing ``as_of``.

    This is the one per-event Python loop left (reading attributes off validated objects); the
    encoder works on the columns with no per-event Python at all. Event timestamps are not
    range-checked here: call :func:`check_timestamps` on the result.
    """
    if len(users) == 1:
        return _one_user(users[0], now)
    n = len(users)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(u.events or ()) for u in users], out=offsets[1:])
    events = [e for u in users for e in u.events or ()]
    # one list per column, then one conversion each: cheaper than np.fromiter over generators
    # aware datetimes -> float epoch seconds -> floor: exact to the second up to LATEST, where the
    # microseconds since the epoch are still fewer than 2**53
    seconds = np.array([e.timestamp.timestamp() for e in events], dtype=np.float64)
    as_of = np.array([now if u.as_of is None else u.as_of.timestamp() for u in users], dtype=np.float64)
    return EventColumns(
        timestamps=np.floor(seconds).astype(np.int64),
        amounts=np.array([e.amount for e in events], dtype=np.float64),
        quantities=np.array([e.quantity for e in events], dtype=np.float64),
        offsets=offsets,
        as_of=np.floor(as_of).astype(np.int64),
        user_ids=[u.user_id for u in users],
    )


def _one_user(user: PredictRequest, now: int) -> EventColumns:
    """:func:`request_columns` for the single-user ``/predict``, without the flattening it does not need."""
    events = user.events or ()
    as_of = now if user.as_of is None else epoch_seconds([user.as_of])[0]
    return EventColumns(
        timestamps=np.array(epoch_seconds([e.timestamp for e in events]), dtype=np.int64),
        amounts=np.array([e.amount for e in events], dtype=np.float64),
        quantities=np.array([e.quantity for e in events], dtype=np.float64),
        offsets=np.array([0, len(events)], dtype=np.int64),
        as_of=np.array([as_of], dtype=np.int64),
        user_ids=[user.user_id],
    )


def check_events(users: Sequence[PredictRequest], limit: int, field: Callable[[int], str]) -> None:
    over = [i for i, user in enumerate(users) if len(user.events or ()) > limit]
    if over:
        raise too_many_events(limit, [field(i) for i in over[:_MAX_LISTED]], len(over))


def check_timestamps(
    columns: EventColumns, event_field: Callable[[int, int], str], as_of_field: Callable[[int], str]
) -> None:
    """The range rule (``service.timestamps``) for timestamps and ``as_of``, on the flat columns:
    the same 422 and field path (``events[3].timestamp``) a per-value pydantic validator gave,
    without a Python call each."""
    users, events, as_of = out_of_range(columns)
    if users.size or as_of.size:
        fields = [event_field(int(u), int(e)) for u, e in zip(users, events, strict=True)]
        fields += [as_of_field(int(u)) for u in as_of]
        raise InvalidInputError(
            "the request body does not match the schema",
            [ErrorDetail(field=f, type="value_error", message=RANGE_MESSAGE) for f in fields[:_MAX_FIELDS]],
        )
