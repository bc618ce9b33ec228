"""``POST /events``, prediction by user id, the admin history routes, and a store that is down,
through the app factory (a fake predictor whose spec uses every channel, a real store)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.features import ALL_CHANNELS, FeatureSpec
from service.store import GuardedStore
from service.store.metrics import StoreMetrics
from service.store.sqlite import SQLiteStore
from service.store.upkeep import compact_once
from tests import waiting
from tests.service.conftest import MAX_EVENTS, MAX_USERS, wait_ready
from tests.service.fakes import FakePredictor, make_metadata
from tests.service.processes import RedisProcess, free_port

TOKEN = "store-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC = FeatureSpec(lookback_bins=8, bin_days=7, channels=ALL_CHANNELS)
AS_OF = "1997-09-30T00:00:00Z"


def all_channel_predictor() -> FakePredictor:
    predictor = FakePredictor(max_batch=MAX_USERS)
    predictor._metadata = make_metadata(spec=SPEC)  # every channel, so every counter matters
    return predictor


def make_client(settings: Settings, **kwargs: Any) -> TestClient:
    app = create_app(settings, predictor=all_channel_predictor(), registry=CollectorRegistry(), **kwargs)
    return TestClient(app, raise_server_exceptions=False)


def store_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "providers": ("CPUExecutionProvider",),
        "max_batch_users": MAX_USERS,
        "max_events_per_user": MAX_EVENTS,
        "admin_token": TOKEN,
        "store_path": tmp_path / "events.sqlite3",
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(store_settings(tmp_path)) as c:
        wait_ready(c)
        yield c


def event(ts: str, amount: float = 10.0, quantity: int = 1, **extra: Any) -> dict[str, Any]:
    return {"timestamp": ts, "amount": amount, "quantity": quantity, **extra}


HISTORY = [
    event("1996-11-02T10:00:00Z", 12.5, 1),
    event("1997-01-12T00:00:00Z", 29.33, 2),
    event("1997-08-02T23:59:59+02:00", 7.0, 1),
    event("1997-09-20T08:00:00Z", 57.0, 4),
    event("1997-10-20T08:00:00Z", 99.0, 9),  # after as_of: ignored both ways
]


def ingest(client: TestClient, user: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    body = {"events": [{"user_id": user, **e} for e in events]}
    r = client.post("/events", json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def test_events_are_acknowledged_and_a_retry_counts_as_duplicates(api: TestClient) -> None:
    events = [{**e, "event_id": f"o-{i}"} for i, e in enumerate(HISTORY[:3])] + HISTORY[3:]
    assert ingest(api, "u-1", events) == {"stored": 5, "duplicates": 0}
    assert ingest(api, "u-1", events) == {"stored": 0, "duplicates": 5}
    metrics = api.get("/metrics").text
    assert "purchase_intent_events_ingested_total 5.0" in metrics
    assert "purchase_intent_events_duplicate_total 5.0" in metrics
    page = api.get("/users/u-1/events", headers=AUTH).json()
    assert page["total"] == 5
    assert [e["event_id"] for e in page["events"]] == ["o-0", "o-1", "o-2", None, None]
    assert page["events"][2]["timestamp"] == "1997-08-02T21:59:59Z"  # stored in UTC


def test_prediction_by_user_id_equals_the_same_events_inline(api: TestClient) -> None:
    ingest(api, "u-1", HISTORY)
    ingest(api, "u-2", HISTORY[1:3])
    by_id = api.post("/predict", json={"user_id": "u-1", "as_of": AS_OF}).json()
    inline = api.post("/predict", json={"user_id": "u-1", "as_of": AS_OF, "events": HISTORY}).json()
    assert by_id == inline
    users: list[dict[str, Any]] = [
        {"user_id": "u-2", "as_of": AS_OF},
        {"user_id": "u-x", "as_of": AS_OF, "events": HISTORY[:2]},
        {"user_id": "u-1", "as_of": AS_OF},
    ]
    mixed = api.post("/predict/batch", json={"users": users}).json()["predictions"]
    stored = {"u-1": HISTORY, "u-2": HISTORY[1:3]}
    for u in users:
        if "events" not in u:
            u["events"] = stored[str(u["user_id"])]
    want = api.post("/predict/batch", json={"users": users}).json()["predictions"]
    assert mixed == want
    assert mixed[0]["probability"] != mixed[2]["probability"]


def test_inline_events_are_used_as_sent_never_merged(api: TestClient) -> None:
    ingest(api, "u-1", HISTORY)
    sent = api.post("/predict", json={"user_id": "u-1", "as_of": AS_OF, "events": []}).json()
    fresh = api.post("/predict", json={"user_id": "never-stored", "as_of": AS_OF, "events": []}).json()
    assert sent["probability"] == fresh["probability"]


def test_an_unknown_user_is_a_404_by_default_and_cold_starts_when_configured(tmp_path: Path) -> None:
    with make_client(store_settings(tmp_path)) as c:
        wait_ready(c)
        r = c.post("/predict/batch", json={"users": [{"user_id": "a", "events": []}, {"user_id": "nobody"}]})
        assert r.status_code == 404
        assert r.json()["error"] == "unknown_user"
        assert r.json()["detail"] == [
            {"field": "users[1].user_id", "type": "unknown_user", "message": "no stored history"}
        ]
    with make_client(store_settings(tmp_path / "cold", store_unknown_user="empty")) as c:
        wait_ready(c)
        cold = c.post("/predict", json={"user_id": "nobody", "as_of": AS_OF})
        empty = c.post("/predict", json={"user_id": "nobody", "as_of": AS_OF, "events": []})
        assert cold.status_code == 200
        assert cold.json() == empty.json()


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"timestamp": "1997-01-12T00:00:00"}, "events[1].timestamp"),  # no offset
        ({"timestamp": 853027200}, "events[1].timestamp"),  # epoch number
        ({"timestamp": "853027200"}, "events[1].timestamp"),  # epoch seconds as a string
        ({"timestamp": "1969-12-31T23:59:59Z"}, "events[1].timestamp"),
        ({"timestamp": "0001-01-01T00:00:00Z"}, "events[1].timestamp"),
        ({"timestamp": "9999-12-31T23:59:59Z"}, "events[1].timestamp"),
        ({"amount": -1.0}, "events[1].amount"),
        ({"amount": "12.5"}, "events[1].amount"),
        ({"quantity": 1.5}, "events[1].quantity"),
        ({"user_id": ""}, "events[1].user_id"),
        ({"event_id": ""}, "events[1].event_id"),
        ({"colour": "red"}, "events[1].colour"),
    ],
)
def test_a_bad_event_is_a_422_naming_it_and_nothing_is_stored(
    api: TestClient, patch: dict[str, Any], field: str
) -> None:
    good = {"user_id": "u-1", **HISTORY[0]}
    r = api.post("/events", json={"events": [good, {**good, "event_id": "x", **patch}]})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_input"
    assert field in {d["field"] for d in r.json()["detail"]}
    assert api.get("/users/u-1/events", headers=AUTH).status_code == 404


def test_event_body_limits_and_errors(api: TestClient) -> None:
    too_many = [
        {"user_id": "u", **event(f"1997-01-01T00:00:{i % 60:02d}Z", i)} for i in range(MAX_EVENTS + 1)
    ]
    r = api.post("/events", json={"events": too_many})
    assert (r.status_code, r.json()["error"]) == (422, "too_many_events")
    assert r.json()["message"] == f"at most {MAX_EVENTS} events per request; split it"
    assert [d["message"] for d in r.json()["detail"]] == [f"more than {MAX_EVENTS} events"]
    assert api.post("/events", json={"events": []}).status_code == 422
    assert api.post("/events", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    assert api.post("/events", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    nan = b'{"events": [{"user_id": "u", "timestamp": "1997-01-01T00:00:00Z", "amount": NaN, "quantity": 1}]}'
    assert api.post("/events", content=nan, headers={"Content-Type": "application/json"}).status_code in (
        400,
        422,
    )


def test_admin_history_routes_need_the_token_and_page_and_erase(api: TestClient) -> None:
    ingest(api, "u/with slash", HISTORY)
    assert api.get("/users/u-1/events").status_code == 401
    assert api.delete("/users/u-1", headers={"Authorization": "Bearer wrong"}).status_code == 401
    path = "/users/u%2Fwith%20slash/events"
    first = api.get(f"{path}?limit=2", headers=AUTH).json()
    assert (first["total"], first["next_offset"], len(first["events"])) == (5, 2, 2)
    last = api.get(f"{path}?offset=4&limit=2", headers=AUTH).json()
    assert (last["next_offset"], len(last["events"])) == (None, 1)
    assert api.get(f"{path}?limit=0", headers=AUTH).status_code == 422
    erased = api.delete("/users/u%2Fwith%20slash", headers=AUTH)
    assert erased.json() == {"user_id": "u/with slash", "deleted_events": 5}
    assert api.get(path, headers=AUTH).json()["error"] == "unknown_user"
    assert api.post("/predict", json={"user_id": "u/with slash"}).status_code == 404
    assert api.delete("/users/u%2Fwith%20slash", headers=AUTH).json()["deleted_events"] == 0


@pytest.mark.parametrize("user", ["line\nbreak", "carriage\rreturn", "100%", "ends/events", "events"])
def test_any_user_id_that_can_be_stored_can_be_read_and_erased(api: TestClient, user: str) -> None:
    ingest(api, user, HISTORY[:2])
    path = f"/users/{quote(user, safe='')}"
    page = api.get(f"{path}/events", headers=AUTH)
    assert (page.status_code, page.json()["user_id"], page.json()["total"]) == (200, user, 2), page.text
    assert api.delete(path, headers=AUTH).json() == {"user_id": user, "deleted_events": 2}
    assert api.get(f"{path}/events", headers=AUTH).status_code == 404


def test_delete_on_the_events_listing_is_a_405_not_an_erasure(api: TestClient) -> None:
    """``/users/u-1/events`` is the listing, which has no DELETE; it never erases a user named
    "u-1/events" (that one is reached with its "/" encoded, as any id with a "/")."""
    ingest(api, "u-1", HISTORY[:2])
    ingest(api, "u-1/events", HISTORY[:1])
    r = api.delete("/users/u-1/events", headers=AUTH)
    assert (r.status_code, r.headers["allow"], r.json()["error"]) == (405, "GET", "method_not_allowed")
    assert api.get("/users/u-1/events", headers=AUTH).json()["total"] == 2
    assert api.get("/users/u-1%2Fevents/events", headers=AUTH).json()["total"] == 1


def test_a_whole_float_quantity_is_the_same_event(api: TestClient) -> None:
    """654.0 is the integer 654 to JSON Schema: taken, and stored as the same event (a duplicate)."""
    assert ingest(api, "u-1", [event("1997-01-12T00:00:00Z", 29.33, 2)])["stored"] == 1
    assert ingest(api, "u-1", [{**event("1997-01-12T00:00:00Z", 29.33), "quantity": 2.0}])["duplicates"] == 1
    assert api.get("/users/u-1/events", headers=AUTH).json()["events"][0]["quantity"] == 2


def test_without_an_admin_token_the_history_routes_do_not_exist(tmp_path: Path) -> None:
    with make_client(store_settings(tmp_path, admin_token=None)) as c:
        wait_ready(c)
        assert c.get("/users/u/events").status_code == 404
        assert c.delete("/users/u").status_code == 404
        assert c.post("/events", json={"events": [{"user_id": "u", **HISTORY[0]}]}).status_code == 200


def test_without_a_store_events_are_required(tmp_path: Path) -> None:
    with make_client(store_settings(tmp_path, store_backend="none")) as c:
        wait_ready(c)
        assert c.get("/readyz").json()["store"] is None
        assert c.post("/events", json={"events": [{"user_id": "u", **HISTORY[0]}]}).status_code == 404
        r = c.post("/predict", json={"user_id": "u"})
        assert (r.status_code, r.json()["detail"][0]["field"]) == (422, "events")
        assert c.post("/predict", json={"user_id": "u", "events": []}).status_code == 200
    assert not (tmp_path / "events.sqlite3").exists()


def test_a_compacted_history_predicts_exactly_like_the_full_history_inline(tmp_path: Path) -> None:
    """Three years of purchases, compacted at "now" with the default retention (400 days): the raw
    events left plus the folded counters score exactly like every event sent inline."""
    settings = store_settings(tmp_path, store_dedup_seconds=0, store_compact_interval_seconds=0)
    backend = SQLiteStore(settings.store_path, timeout=5)
    now = int(time.time())
    rng = np.random.default_rng(3)
    stamps = sorted(now - int(s) for s in rng.integers(0, 3 * 365 * 86_400, 45))
    events = [
        event(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)), float(rng.integers(1, 400)) / 4, int(q))
        for t, q in zip(stamps, rng.integers(1, 5, 45), strict=True)
    ]
    as_of = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    with make_client(settings, store=backend) as c:
        wait_ready(c)
        ingest(c, "long-lived", events)
        compacted = compact_once(
            GuardedStore(backend, StoreMetrics(CollectorRegistry(), latency_buckets=(1.0,))),
            settings,
            SPEC,
            # after the ingest, not at `now`: only events stored before the compaction's clock fold,
            # and on a busy machine the set-up above can take longer than a second
            time.time() + 1,
        )
        assert compacted.events > 0
        page = c.get("/users/long-lived/events", headers=AUTH).json()
        assert page["total"] + compacted.events == 45
        assert page["folded"]["purchase_days"] > 0
        by_id = c.post("/predict", json={"user_id": "long-lived", "as_of": as_of}).json()
        inline = c.post("/predict", json={"user_id": "long-lived", "as_of": as_of, "events": events}).json()
        assert by_id == inline
        # an as_of whose window reaches into the folded years cannot be answered exactly: refused
        early = c.post("/predict", json={"user_id": "long-lived", "as_of": "2000-01-01T00:00:00Z"})
        assert early.status_code == 422
        assert early.json()["error"] == "history_compacted"
        assert early.json()["detail"][0]["field"] == "as_of"


def _wait_store_unavailable(c: TestClient) -> None:
    waiting.wait_until(
        lambda: c.get("/readyz").json().get("status") == "store_unavailable",
        timeout=10,
        message=lambda: f"readiness never reported the store down: {c.get('/readyz').json()}",
    )


def test_an_unusable_sqlite_file_is_a_503_for_store_calls_and_readiness(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with make_client(store_settings(tmp_path, store_path=blocker / "events.sqlite3")) as c:
        _wait_store_unavailable(c)
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["store"] == "unavailable"
        write = c.post("/events", json={"events": [{"user_id": "u", **HISTORY[0]}]})
        read = c.post("/predict", json={"user_id": "u"})
        for r in (write, read):
            assert r.status_code == 503
            assert r.json()["error"] == "store_unavailable"
            assert r.headers["retry-after"] == "1"
            assert str(tmp_path) not in r.text
        assert c.post("/predict", json={"user_id": "u", "events": HISTORY}).status_code == 200
        metrics = c.get("/metrics").text
        assert 'purchase_intent_store_errors_total{operation="write"} 1.0' in metrics
        assert "purchase_intent_store_up 0.0" in metrics
        assert "purchase_intent_ready 0.0" in metrics


@pytest.mark.slow
def test_redis_down_is_a_503_and_the_service_recovers_when_it_is_back(tmp_path: Path) -> None:
    redis = RedisProcess(free_port(), tmp_path / "redis")
    settings = store_settings(tmp_path, store_backend="redis", redis_url=redis.url, store_timeout_seconds=0.5)
    app: FastAPI = create_app(settings, predictor=all_channel_predictor(), registry=CollectorRegistry())
    with TestClient(app, raise_server_exceptions=False) as c:
        _wait_store_unavailable(c)
        assert c.get("/readyz").status_code == 503
        assert c.post("/events", json={"events": [{"user_id": "u", **HISTORY[0]}]}).status_code == 503
        assert c.post("/predict", json={"user_id": "u"}).status_code == 503
        redis.start()
        try:
            wait_ready(c)
            assert c.get("/readyz").json()["store"] == "ok"
            assert ingest(c, "u", HISTORY) == {"stored": 5, "duplicates": 0}
            by_id = c.post("/predict", json={"user_id": "u", "as_of": AS_OF}).json()
            inline = c.post("/predict", json={"user_id": "u", "as_of": AS_OF, "events": HISTORY}).json()
            assert by_id == inline
        finally:
            redis.stop()
