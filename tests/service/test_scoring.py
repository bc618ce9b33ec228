"""Request objects -> columns: the single-user shortcut gives what the general path gives, and the
range check's quick "all in range" answer agrees with the full search."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from service.schemas import LATEST_SECONDS, PredictRequest
from service.scoring import EventColumns, out_of_range, to_columns

NOW = 1_000_000_000


def _user(rng: np.random.Generator, index: int) -> PredictRequest:
    start = datetime(1997, 1, 1, tzinfo=UTC)
    events = [
        {
            "timestamp": (start + timedelta(seconds=int(s), microseconds=int(us))).isoformat(),
            "amount": float(a),
            "quantity": int(q),
        }
        for s, us, a, q in zip(
            rng.integers(0, 400 * 86_400, size=index % 7),
            rng.integers(0, 1_000_000, size=index % 7),
            rng.gamma(2.0, 10.0, size=index % 7),
            rng.integers(1, 5, size=index % 7),
            strict=True,
        )
    ]
    as_of = None if index % 3 == 0 else (start + timedelta(days=500, microseconds=999_999)).isoformat()
    body = {"user_id": f"u{index}", "events": events, "as_of": as_of}
    return PredictRequest.model_validate_json(json.dumps(body))  # as the service parses it


@pytest.mark.parametrize("index", range(12))
def test_one_user_columns_equal_that_user_in_a_batch(index: int) -> None:
    users = [_user(np.random.default_rng(7), i) for i in range(12)]
    alone = to_columns([users[index]], NOW)
    batch = to_columns(users, NOW)
    lo, hi = batch.offsets[index], batch.offsets[index + 1]
    for name in ("timestamps", "amounts", "quantities"):
        got, want = getattr(alone, name), getattr(batch, name)[lo:hi]
        assert got.dtype == want.dtype, name
        assert np.array_equal(got, want), name
    assert np.array_equal(alone.offsets, [0, hi - lo])
    assert alone.as_of.dtype == np.int64
    assert np.array_equal(alone.as_of, batch.as_of[index : index + 1])


def _brute_force(columns: EventColumns) -> tuple[list[tuple[int, int]], list[int]]:
    events = []
    for u in range(columns.n_users):
        for e, ts in enumerate(columns.timestamps[columns.offsets[u] : columns.offsets[u + 1]]):
            if not 0 <= ts < LATEST_SECONDS:
                events.append((u, e))
    as_of = [u for u, ts in enumerate(columns.as_of) if not 0 <= ts < LATEST_SECONDS]
    return events, as_of


@pytest.mark.parametrize("seed", range(20))
def test_out_of_range_matches_a_brute_force_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, size=6)
    n = int(counts.sum())
    timestamps = rng.integers(1, LATEST_SECONDS - 1, size=n)
    as_of = rng.integers(1, LATEST_SECONDS - 1, size=6)
    if seed % 2:  # half the cases all in range, the others with a few bad values at the edges
        timestamps[rng.random(n) < 0.2] = rng.choice([-1, LATEST_SECONDS, LATEST_SECONDS + 5])
        as_of[rng.random(6) < 0.2] = -86_400
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    columns = EventColumns(timestamps, np.ones(n), np.ones(n), offsets, as_of)
    users, events, bad_as_of = out_of_range(columns)
    want_events, want_as_of = _brute_force(columns)
    assert list(zip(users.tolist(), events.tolist(), strict=True)) == want_events
    assert bad_as_of.tolist() == want_as_of
