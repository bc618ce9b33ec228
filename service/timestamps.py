"""The one timestamp range rule: every timestamp and ``as_of`` lies in [EARLIEST, LATEST).

Anything outside is a client bug (a millisecond epoch read as seconds, a year-1 sentinel) that
would silently land in no bin, so it is a 422 wherever it is checked: per value by pydantic, or
vectorised over epoch-second columns by the prediction routes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import numpy as np
from numpy.typing import NDArray
from pydantic_core import TzInfo

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
#: The same bounds in epoch seconds, for the vectorised check on flattened columns.
EARLIEST_SECONDS = int(EARLIEST.timestamp())
LATEST_SECONDS = int(LATEST.timestamp())
#: The range in a few words, for OpenAPI descriptions.
SPAN = f"from {EARLIEST:%Y-%m-%dT%H:%M:%SZ} up to (not including) {LATEST:%Y-%m-%dT%H:%M:%SZ}"
#: What a per-value check raises; pydantic prefixes it with ``Value error, ``.
RANGE_RULE = f"must be between {EARLIEST:%Y-%m-%dT%H:%M:%SZ} and {LATEST:%Y-%m-%dT%H:%M:%SZ}"
#: The message (with pydantic ``type`` ``value_error``) of an out-of-range timestamp, wherever it
#: is checked, so a vectorised check answers exactly as pydantic's validator does.
RANGE_MESSAGE = f"Value error, {RANGE_RULE}"


def check_range(value: datetime) -> datetime:
    """The rule for one aware datetime, as a pydantic ``AfterValidator``."""
    if not (EARLIEST <= value < LATEST):
        raise ValueError(RANGE_RULE)
    return value


_SECOND = timedelta(seconds=1)
_FEW = 64  # values below which a range check runs in Python
_FIXED_OFFSET = (timezone, TzInfo)  # one offset whatever the date, unlike a zoneinfo zone
_EPOCH_ORDINAL = EARLIEST.toordinal()


def epoch_seconds(values: Sequence[datetime]) -> list[int]:
    """Aware datetimes as whole epoch seconds, floored: ``math.floor(value.timestamp())`` each, in
    integer arithmetic. ``timestamp()`` asks the tzinfo for its offset on every call, the larger
    part of a short history's conversion; here a fixed-offset tzinfo (what pydantic parses RFC 3339
    into) is asked once. The same integers wherever the float holds the second exactly, which
    covers the whole range and far beyond."""
    out: list[int] = []
    zone: tzinfo | None = None
    offset: int | None = None  # whole seconds; None: ask timestamp() (a zone, a fractional offset)
    for value in values:
        if value.tzinfo is not zone or zone is None:
            zone = value.tzinfo
            delta = value.utcoffset()
            if delta is None:
                raise ValueError("epoch_seconds takes aware datetimes only")
            fixed = type(zone) in _FIXED_OFFSET and delta % _SECOND == timedelta(0)
            offset = delta // _SECOND if fixed else None
        if offset is None:
            out.append(math.floor(value.timestamp()))
        else:  # the microseconds cannot carry below the whole-second offset: floored away
            days = value.toordinal() - _EPOCH_ORDINAL
            out.append(days * 86_400 + value.hour * 3600 + value.minute * 60 + value.second - offset)
    return out


def in_range(seconds: NDArray[np.int64] | NDArray[np.float64]) -> NDArray[np.bool_]:
    """Which epoch seconds obey the rule (NaN does not)."""
    return (seconds >= EARLIEST_SECONDS) & (seconds < LATEST_SECONDS)


def all_in_range(seconds: NDArray[np.int64] | NDArray[np.float64]) -> bool:
    """:func:`in_range` for every value, in two reductions and no temporary masks (the common case)."""
    if seconds.size <= _FEW and seconds.dtype.kind == "i":  # a lone request's: numpy's reductions cost more
        values = seconds.tolist()
        return not values or (min(values) >= EARLIEST_SECONDS and max(values) < LATEST_SECONDS)
    return seconds.size == 0 or bool(seconds.min() >= EARLIEST_SECONDS and seconds.max() < LATEST_SECONDS)
