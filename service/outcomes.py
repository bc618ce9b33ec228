"""Realized outcomes: served predictions kept in the event store until their horizon has passed,
then settled from the purchases stored since and scored per model version.

The label is training's: at least one purchase in ``(as_of, as_of + horizon]``, to the second.
Time is the events' own: the latest event timestamp the store has seen, capped at the wall clock.
A replay or a backfill (as_of in the past) settles once its holdout purchases are in, not the
moment it is recorded, and a pipeline that delivers purchases late delays settling instead of
turning every late purchase into a "did not buy"; a bogus future timestamp cannot run the clock
past now. A prediction is settled once that clock is ``PI_OUTCOMES_GRACE_SECONDS`` past its horizon.
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from service.columns import EventColumns
from service.features import SECONDS_PER_DAY
from service.quality import Quality, quality
from service.store import COMPACTED, UNOBSERVED, GuardedStore, History, Prediction

#: Predictions settled per store round trip (one ``due`` read, one history read, one write).
SETTLE_BATCH = 2_000
#: Most settle batches in one round of the job; the rest waits for the next round.
_MAX_BATCHES = 100

#: ``purchase_intent_outcome_predictions_total`` results and ``..._settled_total`` outcomes.
RECORD_RESULTS: tuple[str, ...] = ("recorded", "duplicate", "sampled_out", "dropped")
SETTLE_OUTCOMES: dict[int, str] = {
    1: "positive",
    0: "negative",
    UNOBSERVED: "unobserved",
    COMPACTED: "compacted",
}


def outcome_of(prediction: Prediction, history: History | None) -> int:
    """1 when the user bought in ``(as_of, as_of + horizon]``, 0 when not, or why it is unknown.

    A user the store has never heard of is :data:`UNOBSERVED` (their purchases may simply not be
    sent here). Raw events decide; folded counters only say which days they span, so a fold that
    may overlap the window leaves no purchase in the raw events :data:`COMPACTED`, not 0.
    """
    if history is None:
        return UNOBSERVED
    start, end = prediction.as_of, prediction.matures_at
    ts = np.asarray(history.timestamps, dtype=np.int64)
    if np.any((ts > start) & (ts <= end)):
        return 1
    folded = history.folded
    if (
        folded is not None
        and folded.purchase_days > 0
        and (folded.last_day + 1) * SECONDS_PER_DAY > start + 1  # its last day reaches past as_of
        and folded.first_day * SECONDS_PER_DAY <= end
    ):
        return COMPACTED
    return 0


class _Served(NamedTuple):
    """One scoring call's answers, as handed over by the scorer (no per-user work on its path)."""

    model_version: str
    horizon_days: int
    user_ids: Sequence[str]
    as_of: NDArray[np.int64]
    probabilities: NDArray[np.float32]
    requested_at: float


class Recorder:
    """Served predictions on their way to the store: a bounded in-memory buffer.

    The scorer hands over whole calls (:meth:`add`: a lock and an append); the flush task drains
    the buffer in a worker thread, where users are sampled by a hash of their id and duplicates of
    a user, version and day dropped before one write. Past ``max_users`` waiting, calls are
    dropped and counted rather than letting the buffer grow while the store is slow or down.
    """

    def __init__(self, *, sample_rate: float, max_users: int) -> None:
        self._threshold = int(sample_rate * 2**32)
        self._all = sample_rate >= 1.0
        self._max_users = max_users
        self._lock = threading.Lock()
        self._calls: deque[_Served] = deque()
        self._users = 0

    def add(
        self,
        model_version: str,
        horizon_days: int,
        columns: EventColumns,
        probabilities: NDArray[np.float32],
        now: float,
    ) -> int:
        """Queue one call's predictions; returns how many users were dropped (buffer full)."""
        ids = columns.user_ids
        n = probabilities.size
        if ids is None:  # every request path names its users; nothing to key an outcome by
            return 0
        served = _Served(model_version, horizon_days, ids, columns.as_of, probabilities, now)
        with self._lock:
            if self._users + n > self._max_users:
                return n
            self._calls.append(served)
            self._users += n
        return 0

    def forget(self, user_id: str) -> int:
        """Drop the user's buffered predictions (erasure); returns how many."""
        with self._lock:
            kept: deque[_Served] = deque()
            removed = 0
            for call in self._calls:
                if user_id not in call.user_ids:
                    kept.append(call)
                    continue
                keep = np.array([u != user_id for u in call.user_ids], dtype=bool)
                removed += int(keep.size - keep.sum())
                if keep.any():
                    ids = [u for u, k in zip(call.user_ids, keep.tolist(), strict=True) if k]
                    kept.append(
                        call._replace(
                            user_ids=ids, as_of=call.as_of[keep], probabilities=call.probabilities[keep]
                        )
                    )
            self._calls = kept
            self._users -= removed
        return removed

    def _sampled(self, user_id: str) -> bool:
        return zlib.crc32(user_id.encode()) < self._threshold

    def drain(self) -> Drained:
        """Everything queued: the predictions to record (the first of each user, version and day)."""
        with self._lock:
            calls, self._calls = self._calls, deque()
            self._users = 0
        if not calls:
            return Drained([], 0, 0)
        # one flat row per user, in arrival order, built by C loops (zip, repeat, tolist)
        users: list[str] = []
        versions: list[str] = []
        horizons: list[int] = []
        times: list[float] = []
        for version, horizon_days, user_ids, _, _, requested_at in calls:
            n = len(user_ids)
            users += user_ids
            versions += repeat(version, n)
            horizons += repeat(horizon_days, n)
            times += repeat(requested_at, n)
        as_of_array = np.concatenate([call.as_of for call in calls])
        as_of = as_of_array.tolist()
        days = (as_of_array // SECONDS_PER_DAY).tolist()
        probabilities = np.concatenate([call.probabilities for call in calls]).tolist()
        # the first row of each user, version and day: built from the last row back, a dict ends up
        # holding each key's first index
        keys = list(zip(users, versions, days, strict=True))
        first = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1), strict=True))
        kept = sorted(first.values())
        sampled_out = 0
        if not self._all:  # a user is in or out on every row, so sampling the first rows is enough
            sampled_out = sum(1 for user in users if not self._sampled(user))
            kept = [i for i in kept if self._sampled(users[i])]
        predictions = [
            Prediction(users[i], versions[i], as_of[i], horizons[i], probabilities[i], times[i]) for i in kept
        ]
        return Drained(predictions, sampled_out, len(users) - sampled_out - len(kept))


@dataclass(frozen=True)
class Drained:
    predictions: list[Prediction]
    sampled_out: int
    duplicates: int  # repeats of a user, version and day within the buffer


def settle_due(store: GuardedStore, settled_by: int) -> dict[int, int]:
    """Settle every recorded prediction whose horizon ended by ``settled_by`` (in batches: one due
    read, one read of those users' histories, one write each); returns how many of each outcome.
    Blocks: call it in a worker thread."""
    counts: dict[int, int] = dict.fromkeys(SETTLE_OUTCOMES, 0)
    for _ in range(_MAX_BATCHES):
        due = store.due(settled_by, SETTLE_BATCH)
        if not due:
            break
        histories = store.histories(list(dict.fromkeys(p.user_id for p in due)))
        settled = [p._replace(outcome=outcome_of(p, histories.get(p.user_id))) for p in due]
        store.settle(settled)
        for p in settled:
            assert p.outcome is not None
            counts[p.outcome] += 1
        if len(due) < SETTLE_BATCH:
            break
    return counts


def score_window(probabilities: dict[str, list[float]], outcomes: dict[str, list[int]]) -> dict[str, Quality]:
    """:func:`service.quality.quality` of each model version's settled predictions."""
    return {
        version: quality(np.asarray(outcomes[version], dtype=np.int64), np.asarray(p, dtype=np.float64))
        for version, p in probabilities.items()
        if p
    }
