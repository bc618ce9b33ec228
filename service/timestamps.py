"""The one timestamp range rule: every timestamp and ``as_of`` lies in [EARLIEST, LATEST).

Anything outside is a client bug (a millisecond epoch read as seconds, a year-1 sentinel) that
would silently land in no bin, so it is a 422 wherever it is checked: per value by pydantic, or
vectorised over epoch-second columns by the prediction routes.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
from numpy.typing import NDArray

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


def in_range(seconds: NDArray[np.int64] | NDArray[np.float64]) -> NDArray[np.bool_]:
    """Which epoch seconds obey the rule (NaN does not)."""
    return (seconds >= EARLIEST_SECONDS) & (seconds < LATEST_SECONDS)


def all_in_range(seconds: NDArray[np.int64] | NDArray[np.float64]) -> bool:
    """:func:`in_range` for every value, in two reductions and no temporary masks (the common case)."""
    return seconds.size == 0 or bool(seconds.min() >= EARLIEST_SECONDS and seconds.max() < LATEST_SECONDS)
