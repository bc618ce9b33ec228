"""The OpenAPI document states the limits the server enforces, with the values from their one home.

schemathesis (test_fuzz_e2e.py) finds where the two disagree on the requests it happens to draw;
these tests pin each limit in the document to its source, and to the answer at its edge.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.schemas import MAX_AMOUNT, MAX_QUANTITY, MIN_QUANTITY, TIMESTAMP_PATTERN
from service.timestamps import EARLIEST, EARLIEST_SECONDS, LATEST, LATEST_SECONDS, check_range
from tests.service.conftest import MAX_EVENTS, MAX_USERS, wait_ready
from tests.service.fakes import FakePredictor

TOKEN = "contract-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AS_OF = "1997-09-30T00:00:00Z"
EVENT = {"timestamp": "1997-08-02T10:00:00Z", "amount": 29.33, "quantity": 2}


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[TestClient]:
    """The app with everything mounted: the store and, behind a token, the admin routes."""
    settings = Settings(
        providers=("CPUExecutionProvider",),
        max_batch_users=MAX_USERS,
        max_events_per_user=MAX_EVENTS,
        admin_token=SecretStr(TOKEN),
        store_path=tmp_path / "events.sqlite3",
    )
    app = create_app(settings, predictor=FakePredictor(max_batch=MAX_USERS), registry=CollectorRegistry())
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def spec(admin: TestClient) -> dict[str, Any]:
    document: dict[str, Any] = admin.get("/openapi.json").json()
    return document


def _schemas(spec: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = spec["components"]["schemas"]
    return schemas


def _branches(declared: dict[str, Any]) -> list[dict[str, Any]]:
    branches: list[dict[str, Any]] = declared.get("anyOf", [declared])
    return branches


def _timestamp_fields(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every place a request takes a timestamp, as the item schema of one value."""
    s = _schemas(spec)
    columns = s["ColumnarEvents"]["properties"]
    as_of_column = next(b for b in columns["as_of"]["anyOf"] if b.get("type") == "array")
    return {
        "Event.timestamp": s["Event"]["properties"]["timestamp"],
        "IngestEvent.timestamp": s["IngestEvent"]["properties"]["timestamp"],
        "PredictRequest.as_of": s["PredictRequest"]["properties"]["as_of"],
        "ColumnarEvents.timestamp": columns["timestamp"]["items"],
        "ColumnarEvents.as_of": as_of_column["items"],
    }


def test_every_timestamp_carries_the_range_of_service_timestamps(spec: dict[str, Any]) -> None:
    for name, declared in _timestamp_fields(spec).items():
        branches = _branches(declared)
        strings = [(b["format"], b["pattern"]) for b in branches if b.get("type") == "string"]
        assert strings == [("date-time", TIMESTAMP_PATTERN)], name
        for number in (b for b in branches if b.get("type") == "number"):
            assert (number["minimum"], number["exclusiveMaximum"]) == (EARLIEST_SECONDS, LATEST_SECONDS), name
    columns = _schemas(spec)["ColumnarEvents"]["properties"]
    assert any(b.get("type") == "number" for b in _branches(columns["timestamp"]["items"]))
    assert (EARLIEST.timestamp(), LATEST.timestamp()) == (EARLIEST_SECONDS, LATEST_SECONDS)


def _rfc3339(instant: datetime, offset_minutes: int, zulu: bool = False) -> str:
    local = instant.astimezone(timezone(timedelta(minutes=offset_minutes)))
    text = local.isoformat()
    return text.replace("+00:00", "Z") if zulu else text


def _in_range(text: str) -> bool:
    try:
        check_range(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return False
    return True


EDGES = [timedelta(0), timedelta(seconds=1), timedelta(minutes=1), timedelta(hours=1), timedelta(hours=23)]
OFFSETS = [-(23 * 60 + 59), -12 * 60, -30, 0, 30, 14 * 60, 23 * 60 + 59]


def test_the_timestamp_pattern_admits_only_instants_the_server_takes() -> None:
    """Around both bounds, with offsets either side of UTC: what the pattern admits is in range;
    in UTC it admits exactly the range (offsets on the first and last day it keeps to one side)."""
    pattern = re.compile(TIMESTAMP_PATTERN)
    instants = [bound + sign * edge for bound in (EARLIEST, LATEST) for edge in EDGES for sign in (1, -1)]
    instants += [datetime(1997, 9, 30, 12, tzinfo=UTC), datetime(2099, 12, 30, 12, tzinfo=UTC)]
    for instant in instants:
        for offset in OFFSETS:
            text = _rfc3339(instant, offset)
            if pattern.fullmatch(text):
                assert _in_range(text), text
        for utc in (_rfc3339(instant, 0, zulu=True), _rfc3339(instant, 0)):
            assert bool(pattern.fullmatch(utc)) == _in_range(utc), utc
    # on the first and last day, offsets on the safe side are admitted
    assert pattern.fullmatch(_rfc3339(EARLIEST + timedelta(hours=1), -30))  # 1970-01-01T00:30-00:30
    assert pattern.fullmatch(_rfc3339(LATEST - timedelta(hours=1), 30))  # 2099-12-31T23:30+00:30
    for far in (datetime(1997, 9, 30, 12, tzinfo=UTC), datetime(2050, 1, 1, tzinfo=UTC)):
        assert all(pattern.fullmatch(_rfc3339(far, offset)) for offset in OFFSETS)
    assert pattern.fullmatch("1997-09-30t23:59:59.123456789z")
    for refused in ("1997-12-31T23:59:60Z", "1997-09-30T12:00:00", "1997-09-30 12:00:00Z", "97-09-30T12:00Z"):
        assert not pattern.fullmatch(refused), refused


@pytest.mark.parametrize(
    ("timestamp", "status"),
    [
        ("1970-01-01T00:00:00Z", 200),
        ("1970-01-01T00:00:00-05:00", 200),
        ("2099-12-31T23:59:59Z", 200),
        ("2099-12-31T23:59:59+05:00", 200),
        ("1969-12-31T23:59:59Z", 422),
        ("2100-01-01T00:00:00Z", 422),
        ("1970-01-01T00:30:00+01:00", 422),  # 1969-12-31T23:30Z: outside the pattern too
    ],
)
def test_the_server_answers_the_pattern_at_the_edges(admin: TestClient, timestamp: str, status: int) -> None:
    assert bool(re.fullmatch(TIMESTAMP_PATTERN, timestamp)) == (status == 200)
    event = {**EVENT, "timestamp": timestamp}
    assert (
        admin.post("/predict", json={"user_id": "u", "as_of": AS_OF, "events": [event]}).status_code == status
    )
    assert admin.post("/events", json={"events": [{"user_id": "u", **event}]}).status_code == status


def test_numbers_carry_their_bounds_from_schemas(spec: dict[str, Any]) -> None:
    s = _schemas(spec)
    quantities = [
        s["Event"]["properties"]["quantity"],
        s["IngestEvent"]["properties"]["quantity"],
        s["ColumnarEvents"]["properties"]["quantity"]["items"],
    ]
    for quantity in quantities:
        assert (quantity["type"], quantity["minimum"], quantity["maximum"]) == (
            "integer",
            MIN_QUANTITY,
            MAX_QUANTITY,
        )
    amounts = [s["Event"]["properties"]["amount"], s["ColumnarEvents"]["properties"]["amount"]["items"]]
    for amount in amounts:
        assert (amount["type"], amount["minimum"], amount["maximum"]) == ("number", 0, MAX_AMOUNT)
    assert s["ColumnarEvents"]["properties"]["offsets"]["items"]["type"] == "integer"


@pytest.mark.parametrize(
    ("quantity", "status"),
    [(654, 200), (654.0, 200), (float(MAX_QUANTITY), 200), (654.5, 422), ("654", 422), (True, 422)],
)
def test_an_integer_is_what_json_schema_calls_one(admin: TestClient, quantity: Any, status: int) -> None:
    """``type: integer`` admits 654.0 (the same number as 654), so every route takes it."""
    event = {**EVENT, "quantity": quantity}
    answers = [
        admin.post("/predict", json={"user_id": "u", "as_of": AS_OF, "events": [event]}),
        admin.post("/events", json={"events": [{"user_id": "u", **event}]}),
        admin.post(
            "/predict/batch",
            json={
                "columns": {
                    "user_id": ["u"],
                    "offsets": [0, 1.0],
                    "timestamp": [EVENT["timestamp"]],
                    "amount": [1],
                    "quantity": [quantity],
                }
            },
        ),
    ]
    for r in answers:
        assert r.status_code == status, r.text
        if status == 422:
            assert [d["type"] for d in r.json()["detail"]] == ["int_type"]


def test_list_limits_follow_the_settings(spec: dict[str, Any]) -> None:
    s = _schemas(spec)

    def max_items(declared: dict[str, Any]) -> int:
        (array,) = (b for b in _branches(declared) if b.get("type") == "array")
        limit: int = array["maxItems"]
        return limit

    assert max_items(s["BatchPredictRequest"]["properties"]["users"]) == MAX_USERS
    assert max_items(s["ColumnarEvents"]["properties"]["user_id"]) == MAX_USERS
    assert max_items(s["PredictRequest"]["properties"]["events"]) == MAX_EVENTS
    assert max_items(s["EventsRequest"]["properties"]["events"]) == MAX_EVENTS


def test_one_past_a_list_limit_is_refused_and_the_limit_itself_taken(admin: TestClient) -> None:
    def batch(n: int) -> dict[str, Any]:
        return {"users": [{"user_id": f"u-{i}", "as_of": AS_OF, "events": []} for i in range(n)]}

    def one(n: int) -> dict[str, Any]:
        return {"user_id": "u", "as_of": AS_OF, "events": [EVENT] * n}

    assert admin.post("/predict/batch", json=batch(MAX_USERS)).status_code == 200
    assert admin.post("/predict/batch", json=batch(MAX_USERS + 1)).status_code == 413
    assert admin.post("/predict", json=one(MAX_EVENTS)).status_code == 200
    assert admin.post("/predict", json=one(MAX_EVENTS + 1)).status_code == 422
    stored = [{"user_id": "u", **EVENT, "event_id": f"e-{i}"} for i in range(MAX_EVENTS + 1)]
    assert admin.post("/events", json={"events": stored[:MAX_EVENTS]}).status_code == 200
    assert admin.post("/events", json={"events": stored}).status_code == 422


def test_a_reload_body_is_optional(spec: dict[str, Any]) -> None:
    assert spec["paths"]["/admin/reload"]["post"]["requestBody"]["required"] is False


def test_the_store_operations_are_linked_by_user_id(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    read, erase = paths["/users/{user_id}/events"]["get"], paths["/users/{user_id}"]["delete"]
    ingest_links = paths["/events"]["post"]["responses"]["200"]["links"]
    assert {link["operationId"] for link in ingest_links.values()} == {
        read["operationId"],
        erase["operationId"],
    }
    assert read["responses"]["200"]["links"]["eraseUser"]["operationId"] == erase["operationId"]
    assert erase["responses"]["200"]["links"]["readStoredEvents"]["operationId"] == read["operationId"]


def test_without_the_admin_routes_there_are_no_links(app: FastAPI) -> None:
    with TestClient(app) as c:
        paths = c.get("/openapi.json").json()["paths"]
    assert "/users/{user_id}" not in paths
    assert "links" not in paths["/events"]["post"]["responses"]["200"]


def test_without_a_store_events_are_required_by_the_schema_too() -> None:
    settings = Settings(providers=("CPUExecutionProvider",), store_backend="none")
    app = create_app(settings, predictor=FakePredictor(), registry=CollectorRegistry())
    with TestClient(app) as c:
        wait_ready(c)
        request = _schemas(c.get("/openapi.json").json())["PredictRequest"]
        assert "events" in request["required"]
        assert request["properties"]["events"]["type"] == "array"  # null is no longer a choice
        for events in ({}, {"events": None}):
            assert c.post("/predict", json={"user_id": "u", **events}).status_code == 422
        assert c.post("/predict", json={"user_id": "u", "events": []}).status_code == 200


def test_with_a_store_events_may_be_left_out(spec: dict[str, Any]) -> None:
    request = _schemas(spec)["PredictRequest"]
    assert "events" not in request["required"]
    assert {b["type"] for b in request["properties"]["events"]["anyOf"]} == {"array", "null"}


def test_the_performance_route_documents_the_version_limit_it_enforces(
    spec: dict[str, Any], admin: TestClient
) -> None:
    operation = spec["paths"]["/v1/model/performance"]["get"]
    (param,) = operation["parameters"]
    declared = next(b for b in _branches(param["schema"]) if b.get("type") == "string")
    assert (param["name"], param["required"]) == ("model_version", False)
    assert (declared["minLength"], declared["maxLength"]) == (1, 256)
    assert {"404", "422"} <= set(operation["responses"])
    assert admin.get("/v1/model/performance", params={"model_version": "v" * 256}).status_code == 404
    assert admin.get("/v1/model/performance", params={"model_version": "v" * 257}).status_code == 422
    assert admin.get("/v1/model/performance", params={"model_version": ""}).status_code == 422
    assert admin.get("/v1/model/performance").status_code == 200
