"""Request objects -> columns: the single-user shortcut gives what the general path gives, and the
range check's quick "all in range" answer agrees with the full search."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from service.api.columns import request_columns
from service.columns import EventColumns, FoldedHistory, concat_columns, out_of_range
from service.features import ALL_CHANNELS, ONE_USER_MAX_EVENTS, FeatureSpec, encode_batch
from service.schemas import PredictRequest
from service.scoring import encode
from service.timestamps import LATEST_SECONDS, epoch_seconds
from tests.service.fakes import FakePredictor

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
    alone = request_columns([users[index]], NOW)
    batch = request_columns(users, NOW)
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


def test_joined_columns_with_folded_history_encode_as_each_alone() -> None:
    """The micro-batcher joins by-id users (some with compacted history) with inline ones: the
    joined batch must encode every user exactly as that user's own columns do."""
    spec = FeatureSpec(lookback_bins=8, bin_days=7, channels=ALL_CHANNELS)
    day = 86_400
    as_of = 12_000 * day

    def part(n_events: int, folded_days: int) -> EventColumns:
        ts = np.array([as_of - (k + 1) * 5 * day for k in range(n_events)], dtype=np.int64)
        folded = None
        if folded_days:
            folded = FoldedHistory(
                purchase_days=np.array([folded_days]),
                first_day=np.array([as_of // day - 900]),
                last_day=np.array([as_of // day - 500]),
                total_amount=np.array([123.5]),
                total_quantity=np.array([7.0]),
            )
        return EventColumns(
            ts, np.full(n_events, 9.5), np.ones(n_events), np.array([0, n_events]), np.array([as_of]), folded
        )

    parts = [part(3, 0), part(2, 4), part(0, 0), part(5, 2)]
    joined = concat_columns(parts)
    assert joined.folded is not None

    def encode(c: EventColumns) -> np.ndarray:
        return encode_batch(c.timestamps, c.amounts, c.quantities, c.offsets, c.as_of, spec, c.folded)

    alone = np.concatenate([encode(p) for p in parts])
    assert np.array_equal(encode(joined), alone)
    assert not np.array_equal(
        encode(concat_columns([part(2, 0), part(5, 0)])), alone[[1, 3]]
    )  # folded counts


def test_epoch_seconds_equal_the_floored_float_timestamps() -> None:
    """The integer conversion a lone request uses gives ``math.floor(value.timestamp())`` (what the
    batch columns compute) for RFC 3339 offsets, fractions of a second, and both edges of the range."""
    rng = np.random.default_rng(11)
    zones: list[tzinfo] = [
        UTC,
        timezone(timedelta(hours=5, minutes=30)),
        timezone(-timedelta(hours=8)),
        timezone(timedelta(0)),
    ]
    zones.append(timezone(timedelta(seconds=1, microseconds=500_000)))  # not whole seconds: the float path
    zones.append(ZoneInfo("Europe/Paris"))  # an offset that changes with the date
    values = [datetime(1970, 1, 1, tzinfo=UTC), datetime(2099, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)]
    values += [
        datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        datetime(2100, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    ]
    for s, us, z in zip(
        rng.integers(-(2**31), 2**32, size=3000),
        rng.integers(0, 1_000_000, size=3000),
        rng.integers(0, len(zones), size=3000),
        strict=True,
    ):
        zone = zones[int(z)]
        values.append(datetime.fromtimestamp(int(s), tz=zone).replace(microsecond=int(us)))
    want = [math.floor(v.timestamp()) for v in values]
    assert epoch_seconds(values) == want
    rfc3339 = [v for v in values if (v.utcoffset() or timedelta(0)) % timedelta(minutes=1) == timedelta(0)][
        :300
    ]
    body = {
        "user_id": "u",
        "events": [{"timestamp": v.isoformat(), "amount": 1.0, "quantity": 1} for v in rfc3339],
    }
    parsed = PredictRequest.model_validate_json(json.dumps(body))  # pydantic's tzinfo, as /predict sees it
    assert epoch_seconds([e.timestamp for e in parsed.events or ()]) == [
        math.floor(v.timestamp()) for v in rfc3339
    ]
    with pytest.raises(ValueError, match="aware"):
        epoch_seconds([datetime(2000, 1, 1)])


@pytest.mark.parametrize("n_events", [0, 20, ONE_USER_MAX_EVENTS, ONE_USER_MAX_EVENTS + 1, 500])
def test_the_scorer_encodes_a_lone_user_as_the_batch_encoder_whatever_its_length(n_events: int) -> None:
    """Short histories go to the one-user encoder, long ones to the batch encoder: the same tensor."""
    rng = np.random.default_rng(n_events)
    ts = NOW - rng.integers(-86_400, 900 * 86_400, size=n_events)
    ts[: n_events // 3] = ts[n_events // 3 : 2 * (n_events // 3)]  # rows sharing their second
    amounts, quantities = np.round(rng.exponential(20.0, n_events), 2), np.ones(n_events)
    columns = EventColumns(
        ts, amounts, quantities, np.array([0, n_events], dtype=np.int64), np.array([NOW], dtype=np.int64)
    )
    predictor = FakePredictor()
    spec = predictor.metadata.feature_spec
    want = encode_batch(ts, amounts, quantities, [0, n_events], NOW, spec)
    assert encode(columns, predictor).tobytes() == want.tobytes()
