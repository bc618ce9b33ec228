"""The bad-input catalogue: every malformed request is a 4xx JSON envelope naming the field.

No case may produce a 5xx, and no error body may contain the value the client sent (each bad
string value below carries MARK so an echo would be caught).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from tests.service.conftest import MAX_EVENTS, MAX_USERS

MARK = "ZZ-ECHO-MARK"
TS = "1997-09-01T00:00:00Z"
GOOD_EVENT: dict[str, Any] = {"timestamp": TS, "amount": 10.0, "quantity": 1}


def one(**fields: Any) -> dict[str, Any]:
    return {"user_id": "u-1", "events": [GOOD_EVENT], "as_of": "1997-09-30T00:00:00Z"} | fields


def event(**fields: Any) -> dict[str, Any]:
    return one(events=[GOOD_EVENT | fields])


def raw_event(amount: str) -> bytes:
    """A body with a non-JSON numeric literal that Python's json module would write (NaN etc.)."""
    event = f'{{"timestamp": "{TS}", "amount": {amount}, "quantity": 1}}'
    return f'{{"user_id": "u", "events": [{event}]}}'.encode()


J = "application/json"


def _nested(depth: int) -> bytes:
    """A body whose ``user_id`` is a list nested ``depth`` deep (too deep for json.dumps to write)."""
    return b'{"user_id": ' + b"[" * depth + b'"x"' + b"]" * depth + b', "events": []}'


# (id, path, body: dict | bytes, content type, status, error code, field named in detail or None)
CASES: list[tuple[str, str, Any, str | None, int, str, str | None]] = [
    ("truncated json", "/predict", b'{"user_id": "u", "events": [', J, 400, "invalid_json", "body"),
    ("empty body", "/predict", b"", J, 400, "invalid_json", "body"),
    ("not utf-8", "/predict", b'{"user_id": "\xff\xfe"}', J, 400, "invalid_json", "body"),
    ("trailing garbage", "/predict", b'{"user_id": "u", "events": []} x', J, 400, "invalid_json", "body"),
    ("text/plain", "/predict", one(), "text/plain", 415, "unsupported_media_type", None),
    (
        "form",
        "/predict",
        b"user_id=u",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
        None,
    ),
    ("no content type", "/predict", one(), None, 415, "unsupported_media_type", None),
    ("array body", "/predict", [one()], J, 422, "invalid_input", "body"),
    ("missing user_id", "/predict", {"events": []}, J, 422, "invalid_input", "user_id"),
    # no events: the stored history is read, and this user has none
    ("missing events, unknown user", "/predict", {"user_id": "u"}, J, 404, "unknown_user", "user_id"),
    ("user_id number", "/predict", one(user_id=42), J, 422, "invalid_input", "user_id"),
    ("user_id empty", "/predict", one(user_id=""), J, 422, "invalid_input", "user_id"),
    ("events object", "/predict", one(events={"a": 1}), J, 422, "invalid_input", "events"),
    ("event not object", "/predict", one(events=[MARK]), J, 422, "invalid_input", "events[0]"),
    ("amount string", "/predict", event(amount=MARK), J, 422, "invalid_input", "events[0].amount"),
    ("amount numeric string", "/predict", event(amount="12"), J, 422, "invalid_input", "events[0].amount"),
    ("amount NaN", "/predict", raw_event("NaN"), J, 422, "invalid_input", "events[0].amount"),
    ("amount Infinity", "/predict", raw_event("Infinity"), J, 422, "invalid_input", "events[0].amount"),
    ("amount -Infinity", "/predict", raw_event("-Infinity"), J, 422, "invalid_input", "events[0].amount"),
    ("amount overflows", "/predict", raw_event("1e400"), J, 422, "invalid_input", "events[0].amount"),
    ("amount negative", "/predict", event(amount=-0.01), J, 422, "invalid_input", "events[0].amount"),
    ("amount huge", "/predict", event(amount=1e12), J, 422, "invalid_input", "events[0].amount"),
    (
        "amount missing",
        "/predict",
        one(events=[{"timestamp": TS, "quantity": 1}]),
        J,
        422,
        "invalid_input",
        "events[0].amount",
    ),
    ("quantity fractional", "/predict", event(quantity=1.5), J, 422, "invalid_input", "events[0].quantity"),
    ("quantity negative", "/predict", event(quantity=-1), J, 422, "invalid_input", "events[0].quantity"),
    # training drops zero-quantity rows, so the service refuses them: one rule on every path
    ("quantity zero", "/predict", event(quantity=0), J, 422, "invalid_input", "events[0].quantity"),
    ("quantity bool", "/predict", event(quantity=True), J, 422, "invalid_input", "events[0].quantity"),
    ("timestamp garbage", "/predict", event(timestamp=MARK), J, 422, "invalid_input", "events[0].timestamp"),
    (
        "timestamp naive",
        "/predict",
        event(timestamp="1997-09-01T00:00:00"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    (
        "timestamp date only",
        "/predict",
        event(timestamp="1997-09-01"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    (
        "timestamp epoch number",
        "/predict",
        event(timestamp=873072000),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    # pydantic reads a string of digits as epoch seconds (milliseconds when large): not RFC 3339
    (
        "timestamp epoch string",
        "/predict",
        event(timestamp="873072000"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    (
        "timestamp epoch milliseconds string",
        "/predict",
        event(timestamp="873072000000"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    (
        "timestamp space separator",
        "/predict",
        event(timestamp="1997-09-01 00:00:00Z"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    ("as_of epoch string", "/predict", one(as_of="875577600"), J, 422, "invalid_input", "as_of"),
    (
        "timestamp year 1",
        "/predict",
        event(timestamp="0001-01-01T00:00:00Z"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    (
        "timestamp year 9999",
        "/predict",
        event(timestamp="9999-12-31T23:59:59Z"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    (
        "timestamp before 1970",
        "/predict",
        event(timestamp="1969-12-31T23:59:59Z"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    (
        "timestamp bad month",
        "/predict",
        event(timestamp="1997-13-01T00:00:00Z"),
        J,
        422,
        "invalid_input",
        "events[0].timestamp",
    ),
    ("as_of naive", "/predict", one(as_of="1997-09-30T00:00:00"), J, 422, "invalid_input", "as_of"),
    ("as_of year 2100", "/predict", one(as_of="2100-01-01T00:00:00Z"), J, 422, "invalid_input", "as_of"),
    ("unknown field", "/predict", one(asof="1997-09-30T00:00:00Z"), J, 422, "invalid_input", "asof"),
    ("unknown event field", "/predict", event(price=1.0), J, 422, "invalid_input", "events[0].price"),
    (
        "too many events",
        "/predict",
        one(events=[GOOD_EVENT] * (MAX_EVENTS + 1)),
        J,
        422,
        "too_many_events",
        "events",
    ),
    ("batch not object", "/predict/batch", [one()], J, 422, "invalid_input", "body"),
    ("batch missing users", "/predict/batch", {}, J, 422, "invalid_input", "users"),
    ("batch empty", "/predict/batch", {"users": []}, J, 422, "invalid_input", "users"),
    (
        "batch user invalid",
        "/predict/batch",
        {"users": [one(), event(amount=-1)]},
        J,
        422,
        "invalid_input",
        "users[1].events[0].amount",
    ),
    (
        "batch too many events",
        "/predict/batch",
        {"users": [one(), one(), one(events=[GOOD_EVENT] * (MAX_EVENTS + 1))]},
        J,
        422,
        "too_many_events",
        "users[2].events",
    ),
    (
        "batch too many users",
        "/predict/batch",
        {"users": [one()] * (MAX_USERS + 1)},
        J,
        413,
        "too_many_users",
        "users",
    ),
    ("batch invalid json", "/predict/batch", b"{users: []}", J, 400, "invalid_json", "body"),
    ("10 MB body", "/predict", b'{"user_id": "' + b"u" * 10_000_000 + b'"}', J, 413, "body_too_large", None),
    ("deeply nested json", "/predict", b"[" * 100_000 + b"]" * 100_000, J, 400, "invalid_json", "body"),
    ("deeply nested value", "/predict", _nested(5000), J, 400, "invalid_json", "body"),
    ("100k events", "/predict", one(events=[GOOD_EVENT] * 100_000), J, 422, "too_many_events", "events"),
    (
        "NaN literal as_of",
        "/predict",
        b'{"user_id": "u", "events": [], "as_of": NaN}',
        J,
        422,
        "invalid_input",
        "as_of",
    ),
    ("huge integer", "/predict", event(quantity=10**4000), J, 422, "invalid_input", "events[0].quantity"),
    ("user_id too long", "/predict", one(user_id="u" * 257), J, 422, "invalid_input", "user_id"),
    ("null body", "/predict", b"null", J, 422, "invalid_input", "body"),
    ("utf-16 body", "/predict", json.dumps(one()).encode("utf-16"), J, 400, "invalid_json", "body"),
    ("application/xml", "/predict", b"<user/>", "application/xml", 415, "unsupported_media_type", None),
    (
        "multipart",
        "/predict",
        b"--x--",
        "multipart/form-data; boundary=x",
        415,
        "unsupported_media_type",
        None,
    ),
    ("json-ish text", "/predict", one(), "text/json", 415, "unsupported_media_type", None),
    ("batch empty users list body", "/predict/batch", b'{"users": []}', J, 422, "invalid_input", "users"),
    (
        "batch 100k events",
        "/predict/batch",
        {"users": [one(events=[GOOD_EVENT] * 100_000)]},
        J,
        422,
        "too_many_events",
        "users[0].events",
    ),
    (
        "batch year 1 and 9999",
        "/predict/batch",
        {"users": [event(timestamp="0001-01-01T00:00:00Z"), one(as_of="9999-12-31T23:59:59Z")]},
        J,
        422,
        "invalid_input",
        "users[0].events[0].timestamp",
    ),
    (
        "batch text/csv",
        "/predict/batch",
        b"user_id,timestamp\n",
        "text/csv",
        415,
        "unsupported_media_type",
        None,
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "code", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_input_is_a_named_4xx(
    client: TestClient,
    registry: CollectorRegistry,
    path: str,
    body: Any,
    content_type: str | None,
    status: int,
    code: str,
    field: str | None,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post(path, content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()
    assert set(error) == {"error", "message", "detail"}
    assert error["error"] == code
    assert error["message"]
    if field is not None:
        assert field in [d["field"] for d in error["detail"]], error
    assert all(set(d) == {"field", "type", "message"} for d in error["detail"])
    assert MARK not in r.text
    assert registry.get_sample_value("purchase_intent_rejected_requests_total", {"reason": code}) == 1


def test_unknown_paths_and_methods_get_the_envelope(client: TestClient) -> None:
    r = client.get("/nope/" + MARK)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    assert MARK not in r.text
    r = client.get("/predict")
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"


def test_a_hostile_key_is_cut_in_the_field_path(client: TestClient) -> None:
    r = client.post("/predict", json=one(**{"k" * 5000: 1}))
    assert r.status_code == 422
    assert len(r.text) < 1000


def test_every_bad_field_is_named_at_once(client: TestClient) -> None:
    body = one(user_id=1, events=[GOOD_EVENT | {"amount": -1, "quantity": "x"}])
    fields = {d["field"] for d in client.post("/predict", json=body).json()["detail"]}
    assert fields == {"user_id", "events[0].amount", "events[0].quantity"}


def test_duplicate_user_ids_in_a_batch_are_scored_independently(client: TestClient) -> None:
    """The documented policy: ids are the caller's labels, not keys; each entry is answered in place."""
    early, late = one(as_of="1997-03-01T00:00:00Z"), one(as_of="1997-09-30T00:00:00Z")
    r = client.post("/predict/batch", json={"users": [early, late, early]})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert [p["user_id"] for p in predictions] == ["u-1", "u-1", "u-1"]
    assert predictions[0] == predictions[2]
    assert predictions[0]["probability"] != predictions[1]["probability"]
