"""The one events -> tensor encoder, shared by training (model_export) and serving (service).

Both sides call :func:`encode_batch` with the model's own :class:`FeatureSpec` (a lone user's short
history goes through :func:`encode_one`, its one-user form: the same tensor), so an offline and an
online score of one user at one ``as_of`` see bit-identical inputs; numpy only, so the service
never pulls in pandas or torch to featurise a request. Timestamps are integer epoch seconds (UTC);
an event falls in bin ``(day(as_of) - day(timestamp)) // bin_days`` of whole UTC days (events after
``as_of`` ignored, even on its day), and purchases are counted by :mod:`service.cleaning`'s rule.
Per user ``[lookback_bins, channels]``, oldest bin first (the last holds ``as_of``), so a
convolution reads time forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from service.cleaning import exact_duplicates
from service.columns import FoldedHistory

SECONDS_PER_DAY = 86_400
_I64_MIN = int(np.iinfo(np.int64).min)  # np.iinfo() builds an object per call: once, here
_I64_MAX = int(np.iinfo(np.int64).max)

#: Every channel the encoder knows, in a fixed order. A spec selects a subset by name.
ALL_CHANNELS: tuple[str, ...] = (
    # per-bin channels
    "purchases",  # distinct purchase days in the bin
    "log_spend",  # log1p(sum of amounts in the bin)
    "log_quantity",  # log1p(sum of quantities in the bin)
    "active",  # 1 from the bin of the user's first purchase on, 0 before it (tells "not yet a
    # customer" from "a customer who did not buy this week"); counts purchases older than the window
    "log_bins_since_purchase",  # log1p(bins since the latest purchase up to this bin); 0 while inactive
    # summary channels: one value per user, broadcast over time; they see the whole history up to
    # as_of, including purchases older than the window, so long-lived users are not truncated
    "log_frequency_total",  # log1p(distinct purchase days up to as_of)
    "log_age_bins",  # log1p(bins since the first purchase)
    "log_recency_bins",  # log1p(bins since the latest purchase)
    "log_spend_total",  # log1p(total spend up to as_of)
)

#: What each channel reads besides timestamps, where it reads more: a log that lacks the column
#: cannot feed the channel (the scoring job checks a model's spec against a log with it).
CHANNEL_COLUMNS: dict[str, tuple[str, ...]] = {
    "log_spend": ("amount",),
    "log_quantity": ("quantity",),
    "log_spend_total": ("amount",),
}

#: The default set leaves out the two summaries that grow with calendar time for everybody (customer
#: age, cumulative spend): in the out-of-time protocol the model is fitted on a younger population
#: than it scores, and those channels made it extrapolate badly (docs/model.md, "Ablations").
DEFAULT_CHANNELS: tuple[str, ...] = (
    "purchases",
    "log_spend",
    "log_quantity",
    "active",
    "log_bins_since_purchase",
    "log_frequency_total",
    "log_recency_bins",
)


@dataclass(frozen=True)
class FeatureSpec:
    """What the encoder produces; stored in the model file so serving cannot drift from training.

    ``lookback_bins`` bins of ``bin_days`` days each (the defaults make it 52 weekly bins).
    """

    lookback_bins: int = 52
    bin_days: int = 7
    channels: tuple[str, ...] = field(default=DEFAULT_CHANNELS)

    def __post_init__(self) -> None:
        if self.lookback_bins < 2:
            raise ValueError(f"lookback_bins must be >= 2, got {self.lookback_bins}")
        if self.bin_days < 1:
            raise ValueError(f"bin_days must be >= 1, got {self.bin_days}")
        if not self.channels:
            raise ValueError("channels must not be empty")
        unknown = [c for c in self.channels if c not in ALL_CHANNELS]
        if unknown:
            raise ValueError(f"unknown channels {unknown}; known: {list(ALL_CHANNELS)}")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"duplicate channels in {list(self.channels)}")

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    def columns_read(self) -> dict[str, tuple[str, ...]]:
        """Each event column these channels read besides timestamps -> the channels that read it."""
        read: dict[str, tuple[str, ...]] = {}
        for channel in self.channels:
            for column in CHANNEL_COLUMNS.get(channel, ()):
                read[column] = (*read.get(column, ()), channel)
        return read

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lookback_bins, len(self.channels))

    def to_dict(self) -> dict[str, Any]:
        return {
            "lookback_bins": self.lookback_bins,
            "bin_days": self.bin_days,
            "channels": list(self.channels),
            "lookback_days": self.lookback_bins * self.bin_days,
            "time_axis": "oldest bin first; the last bin contains as_of",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(
            lookback_bins=int(data["lookback_bins"]),
            bin_days=int(data["bin_days"]),
            channels=tuple(str(c) for c in data["channels"]),
        )


@dataclass(frozen=True)
class UserSummary:
    """Whole-history facts per user up to ``as_of`` (the RFM view; baselines use it too).

    Ages are in whole days before ``day(as_of)``; ``-1`` where a user has no purchase.
    """

    purchase_days: NDArray[np.int64]
    first_age_days: NDArray[np.int64]
    last_age_days: NDArray[np.int64]
    total_amount: NDArray[np.float64]
    total_quantity: NDArray[np.float64]


@dataclass(frozen=True)
class _Prepared:
    n_users: int
    user: NDArray[np.int64]  # per kept event
    age_days: NDArray[np.int64]  # per kept event
    amounts: NDArray[np.float64]
    quantities: NDArray[np.float64]
    day_user: NDArray[np.int64]  # per distinct (user, day), sorted by user then age
    day_age: NDArray[np.int64]
    summary: UserSummary
    folded_last_age: NDArray[np.int64]  # age of the newest folded purchase day; -1 where none


def _as_offsets(offsets: ArrayLike, n_events: int) -> NDArray[np.int64]:
    off = np.asarray(offsets, dtype=np.int64)
    if off.ndim != 1 or off.size < 1:
        raise ValueError("offsets must be a 1-D array of n_users + 1 positions")
    if off[0] != 0 or off[-1] != n_events:
        raise ValueError(f"offsets must start at 0 and end at the number of events ({n_events})")
    if (off[1:] < off[:-1]).any():  # not np.diff: its Python wrapper shows in a one-user encode
        raise ValueError("offsets must be non-decreasing")
    return off


def _prepare(
    timestamps: ArrayLike,
    amounts: ArrayLike,
    quantities: ArrayLike,
    offsets: ArrayLike,
    as_of: ArrayLike,
    folded: FoldedHistory | None = None,
) -> _Prepared:
    ts = np.asarray(timestamps, dtype=np.int64).reshape(-1)
    amt = np.asarray(amounts, dtype=np.float64).reshape(-1)
    qty = np.asarray(quantities, dtype=np.float64).reshape(-1)
    if not (ts.size == amt.size == qty.size):
        raise ValueError(
            f"timestamps, amounts and quantities differ in length: {ts.size}, {amt.size}, {qty.size}"
        )
    off = _as_offsets(offsets, ts.size)
    n_users = off.size - 1
    as_of_arr = np.asarray(as_of, dtype=np.int64)
    if as_of_arr.ndim > 1 or (as_of_arr.ndim == 1 and as_of_arr.size != n_users):
        raise ValueError(f"as_of must be a scalar or one value per user ({n_users})")
    as_of_u = as_of_arr if as_of_arr.ndim == 1 else np.full(n_users, as_of_arr, dtype=np.int64)

    user = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(off))
    keep = ts <= as_of_u[user]
    user, ts, amt, qty = user[keep], ts[keep], amt[keep], qty[keep]
    age = as_of_u[user] // SECONDS_PER_DAY - ts // SECONDS_PER_DAY

    # distinct (user, day) pairs, sorted by user then age: one purchase per user-day. A stable
    # argsort rather than np.unique: events arrive grouped by user, runs a stable sort exploits,
    # and its order shows which events share a day.
    span = int(age.max()) + 1 if age.size else 1
    day_key = user * span + age
    order = np.argsort(day_key, kind="stable")
    sorted_key = day_key[order]
    first_of_day = np.empty(sorted_key.size, dtype=np.bool_)
    first_of_day[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first_of_day[1:])
    keys = sorted_key[first_of_day]
    if keys.size < age.size:
        # Exact duplicates share a day, so only events on a day with others can be one: the rule
        # runs on those alone, and a history of one event a day skips it. Dropping a duplicate
        # leaves the set of purchase days as it is.
        shared = ~first_of_day
        shared[:-1] |= ~first_of_day[1:]
        rows = order[shared]
        repeated = rows[exact_duplicates(user[rows], ts[rows], amt[rows], qty[rows])]
        if repeated.size:
            once = np.ones(age.size, dtype=np.bool_)
            once[repeated] = False
            user, age, amt, qty = user[once], age[once], amt[once], qty[once]
    day_user = keys // span
    day_age = keys % span

    purchase_days = np.bincount(day_user, minlength=n_users).astype(np.int64)
    has = purchase_days > 0
    starts = np.cumsum(purchase_days) - purchase_days
    last_age = np.full(n_users, -1, dtype=np.int64)
    first_age = np.full(n_users, -1, dtype=np.int64)
    last_age[has] = day_age[starts[has]]
    first_age[has] = day_age[starts[has] + purchase_days[has] - 1]
    total_amount = np.bincount(user, weights=amt, minlength=n_users).astype(np.float64)
    total_quantity = np.bincount(user, weights=qty, minlength=n_users).astype(np.float64)
    folded_last_age = np.full(n_users, -1, dtype=np.int64)
    if folded is not None:
        f_has = np.asarray(folded.purchase_days, dtype=np.int64) > 0
        if f_has.shape != (n_users,):
            raise ValueError(f"folded history must hold one entry per user ({n_users})")
        as_day = as_of_u // SECONDS_PER_DAY
        f_first = np.where(f_has, as_day - folded.first_day, -1)
        f_last = np.where(f_has, as_day - folded.last_day, -1)
        if np.any(f_has & (f_last < 0)):
            raise ValueError("folded purchases after as_of: the history was compacted past it")
        # a user's first purchase is the older of the two; the last the newer one where both exist
        first_age = np.maximum(first_age, f_first)
        last_age = np.where(has & f_has, np.minimum(last_age, f_last), np.where(has, last_age, f_last))
        purchase_days = purchase_days + np.where(f_has, folded.purchase_days, 0)
        total_amount = total_amount + np.where(f_has, folded.total_amount, 0.0)
        total_quantity = total_quantity + np.where(f_has, folded.total_quantity, 0.0)
        folded_last_age = f_last
    summary = UserSummary(
        purchase_days=purchase_days,
        first_age_days=first_age,
        last_age_days=last_age,
        total_amount=total_amount,
        total_quantity=total_quantity,
    )
    return _Prepared(n_users, user, age, amt, qty, day_user, day_age, summary, folded_last_age)


def summarise(
    timestamps: ArrayLike,
    amounts: ArrayLike,
    quantities: ArrayLike,
    offsets: ArrayLike,
    as_of: ArrayLike,
) -> UserSummary:
    """Whole-history summary per user (events after ``as_of`` ignored); same rules as the encoder."""
    return _prepare(timestamps, amounts, quantities, offsets, as_of).summary


def encode_batch(
    timestamps: ArrayLike,
    amounts: ArrayLike,
    quantities: ArrayLike,
    offsets: ArrayLike,
    as_of: ArrayLike,
    spec: FeatureSpec,
    folded: FoldedHistory | None = None,
) -> NDArray[np.float32]:
    """Encode many users at once: ``float32 [n_users, lookback_bins, channels]``.

    Events are columnar: user ``i`` owns ``timestamps[offsets[i]:offsets[i + 1]]`` (and the same
    slice of amounts and quantities), in any order. ``as_of`` is one epoch-second value or one per
    user. The work is a handful of sorts and bincounts over all events, never a per-event loop.
    ``folded``: counters of purchases compacted out of a stored history (all older than the window).
    """
    p = _prepare(timestamps, amounts, quantities, offsets, as_of, folded)
    n, n_bins, bin_days = p.n_users, spec.lookback_bins, spec.bin_days
    if (
        folded is not None
        and int(p.folded_last_age.max(initial=-1)) >= 0
        and int(p.folded_last_age[p.folded_last_age >= 0].min()) < (n_bins * bin_days)
    ):
        raise ValueError("folded purchases inside the window: the history was compacted past as_of")
    s = p.summary
    has = s.purchase_days > 0
    wanted = set(spec.channels)
    out: dict[str, NDArray[np.float64]] = {}

    ev_bin = p.age_days // bin_days
    ev_in = ev_bin < n_bins
    ev_cell = p.user[ev_in] * n_bins + (n_bins - 1 - ev_bin[ev_in])
    day_bin = p.day_age // bin_days
    day_in = day_bin < n_bins
    day_cell = p.day_user[day_in] * n_bins + (n_bins - 1 - day_bin[day_in])

    purchases = np.bincount(day_cell, minlength=n * n_bins).reshape(n, n_bins).astype(np.float64)
    out["purchases"] = purchases
    if "log_spend" in wanted:
        spend = np.bincount(ev_cell, weights=p.amounts[ev_in], minlength=n * n_bins)
        out["log_spend"] = np.log1p(spend.reshape(n, n_bins))
    if "log_quantity" in wanted:
        qty = np.bincount(ev_cell, weights=p.quantities[ev_in], minlength=n * n_bins)
        out["log_quantity"] = np.log1p(qty.reshape(n, n_bins))

    t_index = np.arange(n_bins, dtype=np.int64)
    # time index of the first purchase; negative when it is older than the window
    first_t = np.where(has, n_bins - 1 - s.first_age_days // bin_days, n_bins)
    active = t_index[None, :] >= first_t[:, None]
    out["active"] = active.astype(np.float64)

    if "log_bins_since_purchase" in wanted:
        # The newest purchase older than the window seeds the running "last purchase" index, so
        # the channel is right from the first bin for users whose history predates the window.
        out_of_window = ~day_in
        seed = np.full(n, _I64_MIN // 2, dtype=np.int64)
        newest_old_age = np.full(n, _I64_MAX, dtype=np.int64)
        np.minimum.at(newest_old_age, p.day_user[out_of_window], p.day_age[out_of_window])
        newest_old_age = np.where(
            p.folded_last_age >= 0, np.minimum(newest_old_age, p.folded_last_age), newest_old_age
        )
        has_old = newest_old_age != _I64_MAX
        seed[has_old] = n_bins - 1 - newest_old_age[has_old] // bin_days
        marks = np.where(purchases > 0, t_index[None, :], seed[:, None])
        last_t = np.maximum.accumulate(marks, axis=1)  # [n, n_bins]
        since = np.where(active, t_index[None, :] - last_t, 0)
        out["log_bins_since_purchase"] = np.log1p(since.astype(np.float64))

    def _broadcast(values: NDArray[np.float64]) -> NDArray[np.float64]:
        return values[:, None]  # [n, 1]: the assignment into ``result`` below broadcasts it over time

    if "log_frequency_total" in wanted:
        out["log_frequency_total"] = _broadcast(np.log1p(s.purchase_days.astype(np.float64)))
    if "log_age_bins" in wanted:
        age_bins = np.where(has, s.first_age_days, 0).astype(np.float64) / bin_days
        out["log_age_bins"] = _broadcast(np.log1p(age_bins))
    if "log_recency_bins" in wanted:
        rec_bins = np.where(has, s.last_age_days, 0).astype(np.float64) / bin_days
        out["log_recency_bins"] = _broadcast(np.log1p(rec_bins))
    if "log_spend_total" in wanted:
        out["log_spend_total"] = _broadcast(np.log1p(s.total_amount))

    result = np.empty((n, n_bins, spec.n_channels), dtype=np.float32)
    for k, name in enumerate(spec.channels):
        result[:, :, k] = out[name]
    return result


#: Most events :func:`encode_one` takes: it walks the events in Python, which beats
#: :func:`encode_batch`'s fixed cost of numpy calls only while a history is short.
ONE_USER_MAX_EVENTS = 128


def encode_one(
    timestamps: Sequence[int],
    amounts: Sequence[float],
    quantities: Sequence[float],
    as_of: int,
    spec: FeatureSpec,
) -> NDArray[np.float32]:
    """:func:`encode_batch` for one user without folded counters: ``float32 [1, lookback_bins,
    channels]``, bit for bit the same tensor (``tests/test_features.py`` compares them).

    A lone request's encoding is a few dozen numpy calls on arrays of a few elements, each call
    costing more than its work: here the per-event part (the ``as_of`` cut, exact duplicates,
    purchase days, totals) runs in plain Python and numpy only does what is per bin. Sums run in
    event order and ``log1p`` is numpy's on contiguous float64, as in :func:`encode_batch`, so
    every float is computed the same way. Meant for at most :data:`ONE_USER_MAX_EVENTS` events.
    """
    n = len(timestamps)
    if len(amounts) != n or len(quantities) != n:
        raise ValueError(
            f"timestamps, amounts and quantities differ in length: {n}, {len(amounts)}, {len(quantities)}"
        )
    n_bins, bin_days = spec.lookback_bins, spec.bin_days
    # exact duplicates share their second: with distinct timestamps there are none to drop
    if n and (max(timestamps) > as_of or len(set(timestamps)) < n):
        timestamps, amounts, quantities = _kept_once(timestamps, amounts, quantities, as_of)
    as_day = as_of // SECONDS_PER_DAY
    ages = [as_day - ts // SECONDS_PER_DAY for ts in timestamps]
    days = sorted(set(ages))  # newest first
    has = bool(days)
    total = 0.0
    for amount in amounts:  # not sum(): the batch encoder's bincount adds in order, uncompensated
        total += amount

    window = n_bins * bin_days
    if has and days[-1] >= window:  # some events older than the window
        inside = [i for i, age in enumerate(ages) if age < window]
        cells = [n_bins - 1 - ages[i] // bin_days for i in inside]
        amounts = [amounts[i] for i in inside]
        quantities = [quantities[i] for i in inside]
    else:
        cells = [n_bins - 1 - age // bin_days for age in ages]
    event_cells = np.array(cells, dtype=np.int64)
    recent = [n_bins - 1 - age // bin_days for age in days if age < window]
    purchases = np.bincount(np.array(recent, dtype=np.int64), minlength=n_bins)
    first_t = n_bins - 1 - days[-1] // bin_days if has else n_bins  # below 0: before the window

    rows = np.zeros((spec.n_channels, n_bins), dtype=np.float64)  # [channels, bins]
    for k, name in enumerate(spec.channels):
        row = rows[k]
        if name == "purchases":
            row[:] = purchases
            continue
        if name == "active":
            row[max(first_t, 0) :] = 1.0
            continue
        if name == "log_spend" or name == "log_quantity":
            weights = amounts if name == "log_spend" else quantities
            row[:] = np.bincount(event_cells, weights=np.array(weights, dtype=np.float64), minlength=n_bins)
        elif name == "log_bins_since_purchase":
            if has:
                start = max(first_t, 0)
                older = len(recent) < len(days)  # the newest purchase before the window seeds it
                seed = n_bins - 1 - days[len(recent)] // bin_days if older else _I64_MIN // 2
                t_index = np.arange(n_bins, dtype=np.int64)
                last_t = np.maximum.accumulate(np.where(purchases > 0, t_index, seed))
                row[start:] = t_index[start:] - last_t[start:]
        elif name == "log_frequency_total":
            row[:] = len(days)
        elif name == "log_age_bins":
            row[:] = (days[-1] if has else 0) / bin_days
        elif name == "log_recency_bins":
            row[:] = (days[0] if has else 0) / bin_days
        elif name == "log_spend_total":
            row[:] = total
        else:  # a channel added to encode_batch only: tests/test_features.py runs every channel
            raise ValueError(f"encode_one does not compute the channel {name!r}")
        np.log1p(row, out=row)
    result = np.empty((1, n_bins, spec.n_channels), dtype=np.float32)
    result[0] = rows.T
    return result


def _kept_once(
    timestamps: Sequence[int], amounts: Sequence[float], quantities: Sequence[float], as_of: int
) -> tuple[list[int], list[float], list[float]]:
    """The events up to ``as_of``, each exact duplicate dropped after its first, in the order given
    (:func:`service.cleaning.exact_duplicates`' rule for one user)."""
    seen: set[tuple[int, float, float]] = set()
    kept_ts: list[int] = []
    kept_amounts: list[float] = []
    kept_quantities: list[float] = []
    for row in zip(timestamps, amounts, quantities, strict=True):
        if row[0] > as_of or row in seen:
            continue
        seen.add(row)
        kept_ts.append(row[0])
        kept_amounts.append(row[1])
        kept_quantities.append(row[2])
    return kept_ts, kept_amounts, kept_quantities


def encode(
    timestamps: ArrayLike,
    amounts: ArrayLike,
    quantities: ArrayLike,
    as_of: int,
    spec: FeatureSpec | None = None,
) -> NDArray[np.float32]:
    """Encode one user's events: ``float32 [lookback_bins, channels]``."""
    ts = np.asarray(timestamps, dtype=np.int64).reshape(-1)
    batch = encode_batch(ts, amounts, quantities, [0, ts.size], as_of, spec or FeatureSpec())
    single: NDArray[np.float32] = batch[0]
    return single
