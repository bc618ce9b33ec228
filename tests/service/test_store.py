"""The event store contract, run against both backends: SQLite (a temp file) and a real redis-server.

What a caller relies on: idempotent appends with honest counts, batch reads that return exactly the
known users, paging, erasure, compaction that loses nothing the encoder needs, and concurrent
writers and readers that lose no event.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.columns import Folded, FoldedHistory
from service.features import ALL_CHANNELS, SECONDS_PER_DAY, FeatureSpec, encode_batch
from service.store import UNOBSERVED, EventStore, NewEvent, Prediction, content_key, event_key
from service.store.redis import RedisStore
from service.store.sqlite import SQLiteStore
from tests.service.processes import RedisProcess, running_redis

DAY = SECONDS_PER_DAY
NOW = 20_000 * DAY + 3600  # a fixed "now": 2024-10-04 01:00 UTC


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    backend: EventStore
    if request.param == "sqlite":
        backend = SQLiteStore(tmp_path / "events.sqlite3", timeout=5.0)
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        backend = RedisStore(server.url, prefix=f"test-{uuid.uuid4().hex[:8]}:", timeout=5.0)
    try:
        yield backend
    finally:
        backend.close()


def ev(user: str, ts: int, amount: float = 1.0, quantity: int = 1, event_id: str | None = None) -> NewEvent:
    return NewEvent(user, event_key(user, event_id, ts, amount, quantity), ts, amount, quantity)


def test_appends_are_idempotent_and_counted(store: EventStore) -> None:
    batch = [ev("a", NOW - DAY, event_id="o-1"), ev("a", NOW - 2 * DAY), ev("b", NOW - DAY, 5.0, 2)]
    first = store.append(batch, NOW)
    assert (first.stored, first.duplicates) == (3, 0)
    retry = store.append(batch, NOW + 5)
    assert (retry.stored, retry.duplicates) == (0, 3)
    # the same id with other content is the same event (first write wins); a twin in one request too
    twice = store.append([ev("a", NOW, 9.0, event_id="o-1"), ev("c", NOW), ev("c", NOW)], NOW)
    assert (twice.stored, twice.duplicates) == (1, 2)
    # event ids are per user: the same id for another user is another event
    assert store.append([ev("b", NOW, event_id="o-1")], NOW).stored == 1
    history = store.histories(["a"])["a"]
    assert sorted(history.timestamps) == [NOW - 2 * DAY, NOW - DAY]


def test_content_keys_tell_events_apart_by_every_field() -> None:
    base = content_key("u", 100, 1.0, 1)
    assert base == content_key("u", 100, 1, 1)  # 1 and 1.0 are the same amount
    assert len({base, content_key("v", 100, 1.0, 1), content_key("u", 101, 1.0, 1)}) == 3
    assert len({base, content_key("u", 100, 1.5, 1), content_key("u", 100, 1.0, 2)}) == 3


def test_batch_reads_return_exactly_the_known_users(store: EventStore) -> None:
    store.append([ev("a", NOW - DAY, 2.5, 3), ev("b", NOW - 3 * DAY), ev("b", NOW - 4 * DAY)], NOW)
    got = store.histories(["b", "nobody", "a", "b"])
    assert set(got) == {"a", "b"}
    assert (got["a"].timestamps, got["a"].amounts, got["a"].quantities) == ([NOW - DAY], [2.5], [3])
    assert sorted(got["b"].timestamps) == [NOW - 4 * DAY, NOW - 3 * DAY]
    assert got["a"].folded is None
    assert store.histories([]) == {}


def test_pages_are_ordered_by_time_and_cover_everything(store: EventStore) -> None:
    stamps = [NOW - k * 3600 for k in (5, 1, 9, 3, 7)]
    store.append([ev("u", t, float(i)) for i, t in enumerate(stamps)], NOW)
    assert store.page("nobody", 0, 10) is None
    seen = []
    offset = 0
    while True:
        page = store.page("u", offset, 2)
        assert page is not None
        assert page.total == 5
        seen += [e.timestamp for e in page.events]
        offset += len(page.events)
        if offset >= page.total:
            break
    assert seen == sorted(stamps)


def test_erasure_forgets_raw_events_and_folded_counters(store: EventStore) -> None:
    store.append([ev("u", NOW - 900 * DAY), ev("u", NOW - DAY), ev("keep", NOW - DAY)], NOW - 30 * DAY)
    store.compact(before_day=NOW // DAY - 400, ingested_before=NOW)
    assert store.histories(["u"])["u"].folded is not None
    assert store.erase("u") == 1
    assert store.histories(["u", "keep"]).keys() == {"keep"}
    assert store.page("u", 0, 10) is None
    assert store.erase("u") == 0
    assert store.append([ev("u", NOW - DAY)], NOW).stored == 1  # a forgotten event may come back


def test_compaction_keeps_recent_and_just_stored_events_raw(store: EventStore) -> None:
    old_day = NOW // DAY - 500
    store.append([ev("u", old_day * DAY + 10, 3.0, 2), ev("u", old_day * DAY + 20, 4.0, 1)], NOW - 30 * DAY)
    store.append([ev("u", (old_day - 10) * DAY, 1.0, 1)], NOW)  # old, but stored just now: kept raw
    store.append([ev("u", NOW - DAY, 7.0, 1)], NOW - 30 * DAY)  # recent: kept raw
    result = store.compact(before_day=NOW // DAY - 400, ingested_before=NOW - 7 * DAY)
    assert (result.users, result.events) == (1, 2)
    history = store.histories(["u"])["u"]
    assert sorted(history.timestamps) == [(old_day - 10) * DAY, NOW - DAY]
    assert history.folded == Folded(1, old_day, old_day, 7.0, 3.0)
    # a retry of a folded event after the dedup window is no longer recognised: the documented limit
    again = store.compact(before_day=NOW // DAY - 400, ingested_before=NOW + 1)
    assert again.events == 1
    folded = store.histories(["u"])["u"].folded
    assert folded == Folded(2, old_day - 10, old_day, 8.0, 4.0)


def test_compaction_folds_one_purchase_once_and_days_whole(store: EventStore) -> None:
    """One purchase stored under two event ids is one purchase when folded, as in training; a day
    with an event too recent to fold stays raw whole, so twins are never split between the two."""
    day_a, day_b = NOW // DAY - 500, NOW // DAY - 450
    twin_a, twin_b = (day_a * DAY + 10, 3.0, 2), (day_b * DAY + 7, 4.0, 1)
    store.append(
        [ev("u", *twin_a, "a-1"), ev("u", *twin_a, "a-2"), ev("u", day_a * DAY + 50, 1.5, 1, "a-3")],
        NOW - 30 * DAY,
    )
    store.append([ev("u", *twin_b, "b-1")], NOW - 30 * DAY)
    store.append([ev("u", *twin_b, "b-2")], NOW)  # the same purchase again, under a new id, just now
    horizon = NOW // DAY - 400
    assert store.compact(before_day=horizon, ingested_before=NOW - 7 * DAY).events == 3
    history = store.histories(["u"])["u"]
    assert history.folded == Folded(1, day_a, day_a, 4.5, 3.0)
    assert history.timestamps == [twin_b[0]] * 2
    assert store.compact(before_day=horizon, ingested_before=NOW + 1).events == 2
    history = store.histories(["u"])["u"]
    assert history.folded == Folded(2, day_a, day_b, 8.5, 4.0)
    assert history.timestamps == []


def _columns(
    histories: list[tuple[list[int], list[float], list[int]]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(h[0]) for h in histories])
    ts = np.array([t for h in histories for t in h[0]], dtype=np.int64)
    amounts = np.array([a for h in histories for a in h[1]], dtype=np.float64)
    quantities = np.array([q for h in histories for q in h[2]], dtype=np.float64)
    return ts, amounts, quantities, offsets


def test_features_from_a_compacted_history_equal_the_full_history(store: EventStore) -> None:
    """Random users with up to three years of history: compact, read back, encode (every channel)."""
    spec = FeatureSpec(lookback_bins=10, bin_days=7, channels=ALL_CHANNELS)
    rng = np.random.default_rng(7)
    users = [f"u{i}" for i in range(40)]
    full: list[tuple[list[int], list[float], list[int]]] = []
    for user in users:
        n = int(rng.integers(0, 40))
        ts = (NOW - rng.integers(0, 3 * 365 * DAY, n)).tolist()
        amounts = (rng.integers(0, 2000, n) / 8).tolist()  # exact in binary: sums in any order agree
        quantities = rng.integers(0, 6, n).tolist()
        full.append((ts, amounts, quantities))
        if n:
            store.append(
                [
                    ev(user, t, a, q, f"e{k}")
                    for k, (t, a, q) in enumerate(zip(ts, amounts, quantities, strict=True))
                ],
                NOW - 30 * DAY,
            )
    known = [u for u, h in zip(users, full, strict=True) if h[0]]
    before_day = NOW // DAY - 100  # keeps more than the 70-day window, like retention does
    result = store.compact(before_day=before_day, ingested_before=NOW)
    assert result.events > 0
    stored = store.histories(users)
    assert set(stored) == set(known)
    as_of = NOW
    want = encode_batch(*_columns(full), as_of, spec)
    kept = [(s.timestamps, s.amounts, s.quantities) if (s := stored.get(u)) else ([], [], []) for u in users]
    folded = [stored[u].folded if u in stored else None for u in users]
    f = FoldedHistory(
        np.array([x.purchase_days if x else 0 for x in folded], dtype=np.int64),
        np.array([x.first_day if x else 0 for x in folded], dtype=np.int64),
        np.array([x.last_day if x else 0 for x in folded], dtype=np.int64),
        np.array([x.total_amount if x else 0.0 for x in folded]),
        np.array([x.total_quantity if x else 0.0 for x in folded]),
    )
    got = encode_batch(*_columns(kept), as_of, spec, f)
    assert np.array_equal(got, want)
    raw_left = sum(len(k[0]) for k in kept)
    assert raw_left < sum(len(h[0]) for h in full)  # it really compacted


def test_concurrent_writers_and_readers_lose_no_event(store: EventStore) -> None:
    """8 writer threads, each sending its own events and re-sending a shared set (retries), to the
    same 4 users, while 4 reader threads read every user's history in a loop."""
    users = ["w0", "w1", "w2", "w3"]
    shared = [ev(users[k % 4], NOW - k * 60, 1.0, 1, f"shared-{k}") for k in range(40)]
    own = {w: [ev(users[k % 4], NOW - k * 7, 2.0, 1, f"own-{w}-{k}") for k in range(60)] for w in range(8)}
    errors: list[BaseException] = []
    results: list[tuple[int, int]] = []
    done = threading.Event()
    lock = threading.Lock()

    def writer(w: int) -> None:
        try:
            for start in range(0, 60, 10):
                r1 = store.append(own[w][start : start + 10], NOW)
                r2 = store.append(shared[start // 10 * 6 : start // 10 * 6 + 8], NOW)
                with lock:
                    results.extend([(r1.stored, r1.duplicates), (r2.stored, r2.duplicates)])
        except BaseException as exc:
            errors.append(exc)

    reads = [0]

    def reader() -> None:
        try:
            while not done.is_set():
                got = store.histories(users)
                for history in got.values():
                    assert len(history.timestamps) == len(history.amounts)
                reads[0] += 1
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(timeout=120)
    done.set()
    for t in readers:
        t.join(timeout=30)
    assert not errors, errors
    unique = {(e.user_id, e.key) for w in own.values() for e in w} | {
        (e.user_id, e.key) for e in shared[: 5 * 6 + 8]
    }
    stored = sum(s for s, _ in results)
    sent = sum(s + d for s, d in results)
    assert stored == len(unique)  # each event stored exactly once, whoever won the race
    assert sent - stored == sum(d for _, d in results)
    final = store.histories(users)
    assert sum(len(h.timestamps) for h in final.values()) == len(unique)
    assert reads[0] > 0
    print(f"concurrency: {sent} events sent by 8 writers, {stored} stored, {reads[0]} batch reads")


# ---- recorded predictions and the event clock (service.outcomes uses them) ----------------------


def pred(
    user: str, as_of: int, p: float = 0.5, version: str = "v1", at: float = NOW, horizon: int = 7
) -> Prediction:
    return Prediction(user, version, as_of, horizon, p, at)


def test_one_prediction_per_user_version_and_day_is_kept_the_first(store: EventStore) -> None:
    first = store.record([pred("a", NOW, 0.25), pred("a", NOW + 60, 0.75), pred("a", NOW, 0.1, "v2")])
    assert (first.stored, first.duplicates) == (2, 1)  # the second "a" on that day of v1 is a duplicate
    again = store.record([pred("a", NOW + 3600, 0.9), pred("b", NOW, 0.3), pred("a", NOW + DAY, 0.6)])
    assert (again.stored, again.duplicates) == (2, 1)
    due = store.due(NOW + 10 * DAY, 100)
    assert sorted((p.user_id, p.model_version, p.as_of, p.probability) for p in due) == [
        ("a", "v1", NOW, 0.25),
        ("a", "v1", NOW + DAY, 0.6),
        ("a", "v2", NOW, 0.1),
        ("b", "v1", NOW, 0.3),
    ]
    assert all(p.outcome is None and p.horizon_days == 7 for p in due)
    assert store.record([]).stored == 0


def test_the_event_clock_is_the_latest_event_time_ever_appended(store: EventStore) -> None:
    assert store.event_clock() is None
    store.append([ev("a", NOW - DAY), ev("a", NOW - 3 * DAY)], NOW)
    assert store.event_clock() == NOW - DAY
    store.append([ev("b", NOW - 5 * DAY)], NOW)  # an older event does not turn it back
    assert store.event_clock() == NOW - DAY
    store.append([ev("a", NOW - DAY)], NOW)  # nor does a duplicate
    store.erase("a")  # nor erasure
    assert store.event_clock() == NOW - DAY
    store.append([ev("c", NOW + 7)], NOW)
    assert store.event_clock() == NOW + 7


def test_due_predictions_are_settled_once_and_windowed_by_horizon_end(store: EventStore) -> None:
    # horizons end at NOW + 7 days + k days for k = 0..4
    store.record([pred(f"u{k}", NOW + k * DAY, p=k / 10) for k in range(5)])
    store.record([pred("w", NOW, p=0.9, version="v2", horizon=1)])
    end = NOW + 7 * DAY
    due = store.due(end + 2 * DAY, 100)
    assert [p.user_id for p in due] == ["w", "u0", "u1", "u2"]  # oldest horizon first
    assert [p.user_id for p in store.due(end + 2 * DAY, 2)] == ["w", "u0"]
    outcomes = {"w": 1, "u0": 1, "u1": 0, "u2": UNOBSERVED}
    store.settle([p._replace(outcome=outcomes[p.user_id]) for p in due])
    assert [p.user_id for p in store.due(end + 10 * DAY, 100)] == ["u3", "u4"]
    window = store.settled(end - 10 * DAY, end + 2 * DAY)
    assert sorted(zip(window.probabilities["v1"], window.outcomes["v1"], strict=True)) == [(0.0, 1), (0.1, 0)]
    assert window.outcomes["v2"] == [1]
    # (after, by]: u0's horizon ends at `end`, so a window after it leaves it out
    assert store.settled(end, end + 2 * DAY).outcomes == {"v1": [0]}
    backlog = store.backlog(end + 3 * DAY)
    assert (backlog.unsettled, backlog.overdue) == (2, 1)
    # an unknown outcome never counts, so it is not kept: u2 is gone, not merely left out
    assert store.prune(settled_before=end + 100 * DAY, recorded_before=0) == 3


def test_pruning_forgets_old_settled_and_long_recorded_predictions(store: EventStore) -> None:
    store.record([pred("old", NOW - 30 * DAY, at=NOW - 30 * DAY), pred("new", NOW, at=NOW)])
    store.record([pred("stale", NOW - 100 * DAY, at=NOW - 100 * DAY, horizon=1000)])  # never due
    store.settle([p._replace(outcome=0) for p in store.due(NOW, 100)])  # "old" only
    assert store.prune(settled_before=NOW - 20 * DAY, recorded_before=NOW - 50 * DAY) == 2
    assert store.settled(0, NOW * 2).outcomes == {}
    assert [p.user_id for p in store.due(NOW * 2, 100)] == ["new"]
    assert store.backlog(NOW).unsettled == 1


def test_erasure_forgets_recorded_predictions_and_settling_does_not_bring_them_back(
    store: EventStore,
) -> None:
    store.record([pred("gone", NOW), pred("kept", NOW)])
    store.append([ev("gone", NOW + DAY)], NOW)
    due = store.due(NOW + 30 * DAY, 100)
    store.erase("gone")
    store.settle([p._replace(outcome=1) for p in due])  # settled after the erasure: nothing comes back
    window = store.settled(0, NOW * 2)
    assert window.outcomes == {"v1": [1]}
    assert store.due(NOW * 2, 100) == []
    assert store.backlog(NOW * 2).unsettled == 0
    assert store.record([pred("gone", NOW)]).stored == 1  # a forgotten prediction may come back
