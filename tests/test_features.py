"""The shared encoder: edge cases a user would notice, vectorised == per-user, and the one-user form
== the batch form, bit for bit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray

from model_export.data import load_transactions
from service.columns import FoldedHistory
from service.features import ALL_CHANNELS, FeatureSpec, encode, encode_batch, encode_one, summarise

DAY = 86_400
AS_OF = 1_000 * DAY + 12 * 3600  # noon on day 1000
SPEC = FeatureSpec(lookback_bins=10, bin_days=7, channels=ALL_CHANNELS)


def ch(x: NDArray[np.float32], name: str) -> NDArray[np.float32]:
    return x[..., SPEC.channels.index(name)]


def days_ago(*ages: int) -> NDArray[np.int64]:
    return np.array([(AS_OF // DAY - a) * DAY + 3600 for a in ages], dtype=np.int64)


def test_no_events_is_all_zero() -> None:
    x = encode([], [], [], AS_OF, SPEC)
    assert x.shape == (10, len(ALL_CHANNELS))
    assert x.dtype == np.float32
    assert not x.any()


def test_single_recent_purchase_lands_in_last_bin() -> None:
    x = encode(days_ago(0), [20.0], [2], AS_OF, SPEC)
    assert ch(x, "purchases").tolist() == [0] * 9 + [1]
    assert ch(x, "log_spend")[-1] == pytest.approx(np.log1p(20.0))
    assert ch(x, "log_quantity")[-1] == pytest.approx(np.log1p(2.0))
    # "not a customer yet" before the first purchase, active from its bin on
    assert ch(x, "active").tolist() == [0] * 9 + [1]
    assert ch(x, "log_frequency_total")[0] == pytest.approx(np.log1p(1.0))


def test_events_after_as_of_are_ignored() -> None:
    base = encode(days_ago(3), [10.0], [1], AS_OF, SPEC)
    later_same_day = AS_OF + 60
    future = AS_OF + 5 * DAY
    with_future = encode(
        np.append(days_ago(3), [later_same_day, future]), [10.0, 99.0, 99.0], [1, 5, 5], AS_OF, SPEC
    )
    np.testing.assert_array_equal(base, with_future)


def test_window_edges() -> None:
    # age 69 days is the last day of bin 9 (the oldest in a 10 x 7-day window); 70 falls outside
    inside = encode(days_ago(69), [5.0], [1], AS_OF, SPEC)
    outside = encode(days_ago(70), [5.0], [1], AS_OF, SPEC)
    assert ch(inside, "purchases")[0] == 1
    assert ch(inside, "purchases").sum() == 1
    assert ch(outside, "purchases").sum() == 0
    # a purchase just outside still makes the user a customer for the whole window
    assert ch(outside, "active").tolist() == [1] * 10
    assert ch(outside, "log_frequency_total")[0] == pytest.approx(np.log1p(1.0))


def test_user_older_than_window_keeps_summary_and_recency() -> None:
    ages = [400, 300, 200, 5]
    x = encode(days_ago(*ages), [1.0] * 4, [1] * 4, AS_OF, SPEC)
    assert ch(x, "purchases").sum() == 1  # only the recent one is inside the window
    assert ch(x, "log_frequency_total")[0] == pytest.approx(np.log1p(4.0))
    assert ch(x, "log_age_bins")[0] == pytest.approx(np.log1p(400 / 7))
    assert ch(x, "log_spend_total")[0] == pytest.approx(np.log1p(4.0))
    # bins since the last purchase are counted from the purchase 200 days ago (bin 28), not from 0
    since = np.expm1(ch(x, "log_bins_since_purchase"))
    assert since[0] == pytest.approx(28 - 9)
    assert since[-1] == pytest.approx(0.0)  # the purchase 5 days ago is in the last bin


def test_same_day_events_count_as_one_purchase() -> None:
    ts = days_ago(2, 2, 2)
    x = encode(ts + np.array([0, 60, 120]), [1.0, 2.0, 3.0], [1, 1, 1], AS_OF, SPEC)
    assert ch(x, "purchases")[-1] == 1
    assert ch(x, "log_spend")[-1] == pytest.approx(np.log1p(6.0))
    assert ch(x, "log_frequency_total")[0] == pytest.approx(np.log1p(1.0))


def test_a_row_logged_twice_is_one_purchase() -> None:
    ts = days_ago(2, 2, 9)
    amt, qty = np.array([5.0, 3.0, 4.0]), np.array([1, 2, 1])
    once = encode(ts, amt, qty, AS_OF, SPEC)
    again = [0, 2, 2]  # the first row once more, the last one twice more
    raw = np.append(ts, ts[again]), np.append(amt, amt[again]), np.append(qty, qty[again])
    np.testing.assert_array_equal(encode(*raw, AS_OF, SPEC), once)
    assert summarise(*raw, [0, 6], AS_OF).total_amount.tolist() == [12.0]
    # the two rows of day 2 share their second but differ: two rows of one purchase day, summed
    assert ch(once, "purchases")[-1] == 1
    assert ch(once, "log_spend")[-1] == pytest.approx(np.log1p(8.0))
    assert ch(once, "log_quantity")[-1] == pytest.approx(np.log1p(3.0))
    # the same row for two users is a purchase of each
    two_users = encode_batch(
        np.append(ts, ts), np.append(amt, amt), np.append(qty, qty), [0, 3, 6], AS_OF, SPEC
    )
    np.testing.assert_array_equal(two_users, np.stack([once, once]))


def test_repeated_rows_leave_every_user_of_a_batch_unchanged() -> None:
    """Random users, several rows a day, per-user ``as_of``, some with folded history: repeating
    rows (shuffled among the others) changes no user's features."""
    rng = np.random.default_rng(11)
    n_users = 300
    counts = rng.integers(0, 15, size=n_users)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])
    # hours of a few days: many rows share a day, some a second
    ts = AS_OF - rng.integers(-2, 90, size=n) * DAY - rng.choice([0, 60, 3600], size=n)
    amt = rng.integers(0, 400, size=n) / 8  # exact in binary: sums in any order agree
    qty = rng.integers(0, 4, size=n)
    as_of = AS_OF - rng.integers(0, 3, size=n_users) * DAY
    has_folded = rng.random(n_users) < 0.3
    folded = FoldedHistory(
        np.where(has_folded, rng.integers(1, 9, n_users), 0),
        np.full(n_users, AS_OF // DAY - 400),
        np.full(n_users, AS_OF // DAY - 200),
        np.where(has_folded, 12.5, 0.0),
        np.where(has_folded, 3.0, 0.0),
    )
    want = encode_batch(ts, amt, qty, offsets, as_of, SPEC, folded)

    user = np.repeat(np.arange(n_users), counts)
    again = rng.random(n) < 0.4
    repeats = np.flatnonzero(again)[rng.integers(0, 3, again.sum()) > 0]  # some rows twice, some thrice
    rows = np.concatenate([np.arange(n), np.flatnonzero(again), repeats])
    rows = rows[np.lexsort((rng.random(rows.size), user[rows]))]  # grouped by user, shuffled within
    raw_offsets = np.concatenate([[0], np.cumsum(np.bincount(user[rows], minlength=n_users))])
    got = encode_batch(ts[rows], amt[rows], qty[rows], raw_offsets, as_of, SPEC, folded)
    assert rows.size > n
    np.testing.assert_array_equal(got, want)


def test_event_order_does_not_matter() -> None:
    ts = days_ago(1, 40, 13, 13, 66)
    amt = np.array([5.0, 7.0, 1.0, 2.0, 9.0])
    qty = np.array([1, 2, 1, 1, 3])
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_array_equal(
        encode(ts, amt, qty, AS_OF, SPEC), encode(ts[perm], amt[perm], qty[perm], AS_OF, SPEC)
    )


def test_batch_equals_per_user_and_per_user_as_of() -> None:
    rng = np.random.default_rng(7)
    n_users = 300
    counts = rng.integers(0, 25, size=n_users)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n = int(offsets[-1])
    ts = AS_OF - rng.integers(-20 * DAY, 500 * DAY, size=n)
    amt = rng.gamma(2.0, 10.0, size=n)
    qty = rng.integers(1, 4, size=n)
    as_of = AS_OF - rng.integers(0, 30 * DAY, size=n_users)
    batch = encode_batch(ts, amt, qty, offsets, as_of, SPEC)
    for u in range(n_users):
        lo, hi = offsets[u], offsets[u + 1]
        np.testing.assert_array_equal(
            batch[u], encode(ts[lo:hi], amt[lo:hi], qty[lo:hi], int(as_of[u]), SPEC)
        )


def test_channel_subset_and_order_follow_the_spec() -> None:
    ts, amt, qty = days_ago(1, 9), [3.0, 4.0], [1, 2]
    full = encode(ts, amt, qty, AS_OF, SPEC)
    sub = FeatureSpec(lookback_bins=10, channels=("active", "purchases"))
    x = encode(ts, amt, qty, AS_OF, sub)
    np.testing.assert_array_equal(x[:, 0], ch(full, "active"))
    np.testing.assert_array_equal(x[:, 1], ch(full, "purchases"))


def test_summary_matches_rfm_definitions() -> None:
    s = summarise(days_ago(30, 30, 10, 2), [1.0, 4.0, 2.0, 3.0], [1, 1, 1, 1], [0, 4], AS_OF)
    assert s.purchase_days.tolist() == [3]
    assert s.first_age_days.tolist() == [30]
    assert s.last_age_days.tolist() == [2]
    assert s.total_amount.tolist() == [10.0]


def test_spec_round_trip_and_validation() -> None:
    spec = FeatureSpec(lookback_bins=39, bin_days=3, channels=("purchases", "active"))
    assert FeatureSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown channels"):
        FeatureSpec(channels=("purchases", "bogus"))
    with pytest.raises(ValueError, match="bin_days"):
        FeatureSpec(bin_days=0)


def test_bad_offsets_are_rejected() -> None:
    with pytest.raises(ValueError, match="offsets"):
        encode_batch([1, 2], [1.0, 1.0], [1, 1], [0, 1], AS_OF, SPEC)
    with pytest.raises(ValueError, match="differ in length"):
        encode_batch([1, 2], [1.0], [1, 1], [0, 2], AS_OF, SPEC)


# ---- encode_one: the one-user form must give encode_batch's tensor, bit for bit ----------------

SPECS = (
    FeatureSpec(),  # the default a served model carries
    SPEC,
    FeatureSpec(lookback_bins=2, bin_days=1, channels=ALL_CHANNELS[::-1]),
    FeatureSpec(lookback_bins=10, bin_days=30, channels=("log_bins_since_purchase", "log_spend_total")),
)


def assert_same_as_batch(
    ts: NDArray[np.int64], amt: NDArray[np.float64], qty: NDArray[np.float64], as_of: int, spec: FeatureSpec
) -> None:
    batch = encode_batch(ts, amt, qty, [0, ts.size], as_of, spec)
    one = encode_one(ts.tolist(), amt.tolist(), qty.tolist(), as_of, spec)
    assert one.dtype == np.float32
    assert one.shape == batch.shape
    assert one.tobytes() == batch.tobytes()  # not allclose: a lone request and a batch answer alike


Events = tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]


def _history(rng: np.random.Generator, as_of: int) -> Events:
    n = int(rng.integers(0, 60))
    span = int(rng.choice([1, 3, 30, 400, 3000])) * DAY
    ts = as_of - rng.integers(-span // 8, span, n)  # some after as_of
    amt = np.round(rng.exponential(30.0, n), int(rng.integers(0, 3)))
    qty = rng.integers(1, 5, n).astype(np.float64)
    if n and rng.random() < 0.5:  # rows logged twice, and other rows on the same second or day
        src = rng.integers(0, n, n // 2)
        ts[: n // 2] = ts[src]
        if rng.random() < 0.7:
            amt[: n // 2], qty[: n // 2] = amt[src], qty[src]
    if n and rng.random() < 0.2:
        amt[rng.integers(0, n)] = 0.0
    return ts, amt, qty


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.lookback_bins}x{s.bin_days}d-{len(s.channels)}ch")
def test_encode_one_equals_the_batch_encoder_on_random_histories(spec: FeatureSpec) -> None:
    rng = np.random.default_rng(len(spec.channels))
    for _ in range(2000):
        as_of = int(rng.integers(900_000_000, 1_100_000_000))
        assert_same_as_batch(*_history(rng, as_of), as_of, spec)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.lookback_bins}x{s.bin_days}d-{len(s.channels)}ch")
def test_encode_one_equals_the_batch_encoder_at_the_edges(spec: FeatureSpec) -> None:
    window = spec.lookback_bins * spec.bin_days
    cases: list[tuple[list[int], list[float]]] = [
        ([], []),  # no history
        ([0], [5.0]),  # on as_of's day
        ([window - 1], [5.0]),  # the oldest day inside the window
        ([window], [5.0]),  # the newest day outside it
        ([window, window + 400], [1.0, 2.0]),  # only purchases older than the window
        ([window + 3, 2, 2, 1], [1.0, 1.0, 1.0, 9.0]),  # same day, same row twice, an old seed
        ([5] * 30, [2.5] * 30),  # one row logged thirty times
    ]
    for ages, amounts in cases:
        ts = days_ago(*ages) if ages else np.zeros(0, dtype=np.int64)
        amt = np.array(amounts, dtype=np.float64)
        assert_same_as_batch(ts, amt, np.ones(len(ages)), AS_OF, spec)
    # a row a second after as_of is ignored, as on the same day
    assert_same_as_batch(np.array([AS_OF, AS_OF + 1]), np.array([1.0, 2.0]), np.ones(2), AS_OF, spec)


def test_encode_one_equals_the_batch_encoder_on_cdnow_customers() -> None:
    tx = load_transactions("cdnow")
    rng = np.random.default_rng(3)
    users = rng.choice(tx.user_ids.size, size=3000, replace=False)
    spec = FeatureSpec()
    for as_of_day in ("1997-03-31", "1997-09-30", "1998-06-30"):
        as_of = int(pd.Timestamp(as_of_day, tz="UTC").timestamp()) + DAY - 1
        for u in users:
            lo, hi = tx.offsets[u], tx.offsets[u + 1]
            assert_same_as_batch(tx.timestamps[lo:hi], tx.amounts[lo:hi], tx.quantities[lo:hi], as_of, spec)


def test_encode_one_refuses_columns_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        encode_one([1, 2], [1.0], [1.0, 1.0], AS_OF, SPEC)
