"""Columnar JSON and Arrow bodies on /predict/batch: the same answers as rows, the same rules, each
problem a 4xx naming the field in the client's format, and a clear 415 without pyarrow."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.ipc
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from service.bulk import ARROW_MEDIA_TYPE
from tests.service.conftest import MAX_EVENTS, MAX_USERS

AS_OF = "1997-09-30T00:00:00Z"
AS_OF_S = 875577600
EVENTS: list[list[tuple[str, int, float, int]]] = [
    [("1997-09-01T00:00:00Z", 873072000, 10.0, 1), ("1997-06-01T12:00:00Z", 865166400, 3.5, 2)],
    [],
    [("1997-09-29T23:59:59Z", 875577599, 100.0, 7)],
]
USERS = ["a", "b", "c"]


def rows() -> dict[str, Any]:
    return {
        "users": [
            {
                "user_id": u,
                "as_of": AS_OF,
                "events": [{"timestamp": t, "amount": a, "quantity": q} for t, _, a, q in events],
            }
            for u, events in zip(USERS, EVENTS, strict=True)
        ]
    }


def columnar(epoch: bool = True, **override: Any) -> dict[str, Any]:
    flat = [e for events in EVENTS for e in events]
    offsets = [0]
    for events in EVENTS:
        offsets.append(offsets[-1] + len(events))
    columns: dict[str, Any] = {
        "user_id": USERS,
        "as_of": [AS_OF_S if epoch else AS_OF] * len(USERS),
        "offsets": offsets,
        "timestamp": [e[1] if epoch else e[0] for e in flat],
        "amount": [e[2] for e in flat],
        "quantity": [e[3] for e in flat],
    }
    return {"columns": columns | override}


EVENT_TYPE = pa.struct(
    [("timestamp", pa.timestamp("ms", tz="UTC")), ("amount", pa.float64()), ("quantity", pa.int32())]
)


def arrow_table(**override: Any) -> pa.Table:
    events = [
        [{"timestamp": datetime.fromtimestamp(s, UTC), "amount": a, "quantity": q} for _, s, a, q in user]
        for user in EVENTS
    ]
    columns: dict[str, Any] = {
        "user_id": pa.array(USERS),
        "as_of": pa.array([datetime.fromtimestamp(AS_OF_S, UTC)] * len(USERS), pa.timestamp("s", tz="UTC")),
        "events": pa.array(events, pa.list_(EVENT_TYPE)),
    }
    columns |= override
    return pa.table({k: v for k, v in columns.items() if v is not None})


def stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def post_arrow(client: TestClient, body: bytes) -> Any:
    return client.post("/predict/batch", content=body, headers={"Content-Type": ARROW_MEDIA_TYPE})


def test_rows_columns_and_arrow_give_the_same_answers(client: TestClient) -> None:
    by_rows = client.post("/predict/batch", json=rows()).json()
    expected = [(p["user_id"], p["probability"], p["will_purchase"]) for p in by_rows["predictions"]]
    for body in (columnar(epoch=True), columnar(epoch=False)):
        answer = client.post("/predict/batch", json=body).json()
        assert {k: answer[k] for k in ("model_version", "threshold", "horizon_days")} == {
            k: by_rows[k] for k in ("model_version", "threshold", "horizon_days")
        }
        c = answer["columns"]
        assert list(zip(c["user_id"], c["probability"], c["will_purchase"], strict=True)) == expected
    r = post_arrow(client, stream(arrow_table()))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ARROW_MEDIA_TYPE
    table = pa.ipc.open_stream(r.content).read_all()
    assert table.schema.field("probability").type == pa.float32()
    got = table.to_pydict()
    assert list(zip(got["user_id"], got["probability"], got["will_purchase"], strict=True)) == expected
    assert table.schema.metadata[b"model_version"] == by_rows["model_version"].encode()


def test_arrow_accepts_epoch_numbers_and_leaves_as_of_to_now_when_absent(client: TestClient) -> None:
    epoch = pa.struct([("quantity", pa.int64()), ("amount", pa.float32()), ("timestamp", pa.int64())])
    events = pa.array([[{"timestamp": 873072000, "amount": 10.0, "quantity": 1}]], pa.list_(epoch))
    r = post_arrow(client, stream(pa.table({"user_id": ["x"], "events": events})))
    assert r.status_code == 200, r.text
    r2 = client.post(
        "/predict/batch",
        json={
            "columns": {
                "user_id": ["x"],
                "offsets": [0, 1],
                "timestamp": [873072000],
                "amount": [10.0],
                "quantity": [1],
            }
        },
    )
    assert r2.status_code == 200, r2.text
    assert (
        pa.ipc.open_stream(r.content).read_all()["probability"][0].as_py()
        == r2.json()["columns"]["probability"][0]
    )


def _error(r: Any, status: int, code: str) -> list[str]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code
    return [d["field"] for d in body["detail"]]


@pytest.mark.parametrize(
    ("override", "status", "code", "field"),
    [
        ({"amount": [10.0, -1.0, 100.0]}, 422, "invalid_input", "columns.amount[1]"),
        ({"quantity": [1, 1.5, 7]}, 422, "invalid_input", "columns.quantity[1]"),
        ({"quantity": [1, True, 7]}, 422, "invalid_input", "columns.quantity[1]"),
        ({"quantity": [1, 0, 7]}, 422, "invalid_input", "columns.quantity[1]"),
        (
            {"timestamp": [873072000, "1997-06-01T12:00:00", 875577599]},
            422,
            "invalid_input",
            "columns.timestamp[1]",
        ),
        # epoch seconds are numbers here; a string of digits is neither a number nor RFC 3339
        ({"timestamp": [873072000, "873072000", 875577599]}, 422, "invalid_input", "columns.timestamp[1]"),
        ({"timestamp": [873072000, -5, 875577599]}, 422, "invalid_input", "columns.timestamp[1]"),
        ({"timestamp": [873072000, 5e12, 875577599]}, 422, "invalid_input", "columns.timestamp[1]"),
        ({"as_of": [AS_OF_S, "2100-01-01T00:00:00Z", None]}, 422, "invalid_input", "columns.as_of[1]"),
        ({"as_of": [AS_OF_S]}, 422, "invalid_input", "columns.as_of"),
        ({"offsets": [0, 2, 2]}, 422, "invalid_input", "columns.offsets"),
        ({"offsets": [0, 3, 2, 3]}, 422, "invalid_input", "columns.offsets"),
        ({"offsets": [0, 2**64, 3, 3]}, 422, "invalid_input", "columns.offsets[1]"),
        ({"offsets": [0, -1, 3, 3]}, 422, "invalid_input", "columns.offsets[1]"),
        ({"amount": [10.0]}, 422, "invalid_input", "columns"),
        ({"user_id": ["a", "", "c"]}, 422, "invalid_input", "columns.user_id[1]"),
        ({"user_id": []}, 422, "invalid_input", "columns.user_id"),
        ({"price": [1.0]}, 422, "invalid_input", "columns.price"),
        ({"user_id": [f"u{i}" for i in range(MAX_USERS + 1)]}, 413, "too_many_users", "columns.user_id"),
    ],
)
def test_bad_columns_are_named_4xx(
    client: TestClient, override: dict[str, Any], status: int, code: str, field: str
) -> None:
    assert field in _error(client.post("/predict/batch", json=columnar(**override)), status, code)


def test_bad_columnar_literals(client: TestClient) -> None:
    body = json.dumps(columnar()).replace("10.0", "NaN").encode()
    r = client.post("/predict/batch", content=body, headers={"Content-Type": "application/json"})
    assert "columns.amount[0]" in _error(r, 422, "invalid_input")


def test_too_many_events_for_one_user_in_columns(client: TestClient) -> None:
    n = MAX_EVENTS + 1
    body = {
        "columns": {
            "user_id": ["a", "b"],
            "offsets": [0, 0, n],
            "timestamp": [873072000] * n,
            "amount": [1.0] * n,
            "quantity": [1] * n,
        }
    }
    assert _error(client.post("/predict/batch", json=body), 422, "too_many_events") == ["columns.offsets[2]"]


def _events(*users: list[dict[str, Any]] | None, kind: pa.DataType = EVENT_TYPE) -> pa.Array:
    return pa.array(list(users), pa.list_(kind))


GOOD = {"timestamp": datetime(1997, 9, 1, tzinfo=UTC), "amount": 1.0, "quantity": 1}


@pytest.mark.parametrize(
    ("override", "status", "code", "field"),
    [
        (
            {"events": _events([GOOD], [], [GOOD, GOOD | {"amount": -2.0}])},
            422,
            "invalid_input",
            "events[2][1].amount",
        ),
        (
            {"events": _events([GOOD], [], [GOOD, GOOD | {"quantity": 0}])},
            422,
            "invalid_input",
            "events[2][1].quantity",
        ),
        (
            {"events": _events([GOOD], [], [GOOD | {"amount": None}])},
            422,
            "invalid_input",
            "events[2][0].amount",
        ),
        (
            {"events": _events([GOOD], [], [GOOD | {"timestamp": datetime(1969, 1, 1, tzinfo=UTC)}])},
            422,
            "invalid_input",
            "events[2][0].timestamp",
        ),
        ({"events": _events([GOOD], None, [])}, 422, "invalid_input", "events[1]"),
        ({"user_id": pa.array(["a", None, "c"])}, 422, "invalid_input", "user_id[1]"),
        ({"user_id": pa.array([1, 2, 3])}, 422, "invalid_input", "user_id"),
        ({"events": None}, 422, "invalid_input", "events"),
        ({"extra": pa.array([1, 2, 3])}, 422, "invalid_input", "extra"),
        (
            {
                "events": _events(
                    [GOOD],
                    [],
                    [],
                    kind=pa.struct(
                        [("timestamp", pa.timestamp("s")), ("amount", pa.float64()), ("quantity", pa.int64())]
                    ),
                )
            },
            422,
            "invalid_input",
            "events.timestamp",
        ),
        (
            {
                "events": _events(
                    [GOOD],
                    [],
                    [],
                    kind=pa.struct(
                        [
                            ("timestamp", pa.timestamp("s", tz="UTC")),
                            ("amount", pa.float64()),
                            ("quantity", pa.float64()),
                        ]
                    ),
                )
            },
            422,
            "invalid_input",
            "events.quantity",
        ),
        ({"as_of": pa.array([AS_OF_S, 5e9, None])}, 422, "invalid_input", "as_of[1]"),
    ],
)
def test_bad_arrow_is_a_named_4xx(
    client: TestClient, override: dict[str, Any], status: int, code: str, field: str
) -> None:
    assert field in _error(post_arrow(client, stream(arrow_table(**override))), status, code)


def test_arrow_limits(client: TestClient) -> None:
    many = pa.table(
        {"user_id": [f"u{i}" for i in range(MAX_USERS + 1)], "events": _events(*[[]] * (MAX_USERS + 1))}
    )
    assert _error(post_arrow(client, stream(many)), 413, "too_many_users") == ["user_id"]
    long = pa.table({"user_id": ["a"], "events": _events([GOOD] * (MAX_EVENTS + 1))})
    assert _error(post_arrow(client, stream(long)), 422, "too_many_events") == ["events[0]"]


@pytest.mark.parametrize("body", [b"", b"garbage", b"\xff" * 64, stream(arrow_table())[:40]])
def test_unreadable_arrow_is_a_400(client: TestClient, registry: CollectorRegistry, body: bytes) -> None:
    assert _error(post_arrow(client, body), 400, "invalid_arrow") == ["body"]
    assert (
        registry.get_sample_value("purchase_intent_rejected_requests_total", {"reason": "invalid_arrow"}) == 1
    )


def test_without_pyarrow_an_arrow_body_is_a_clear_415(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    r = post_arrow(client, stream(arrow_table()))
    assert _error(r, 415, "unsupported_media_type") == []
    assert "arrow" in r.json()["message"]
    assert client.post("/predict/batch", json=columnar()).status_code == 200  # JSON still works


def test_compressed_and_dictionary_arrow_streams_are_refused(client: TestClient) -> None:
    """A compressed buffer can decode to far more than the body limit: refused before decoding."""
    for compression in ("zstd", "lz4"):
        table = arrow_table()
        sink = pa.BufferOutputStream()
        options = pa.ipc.IpcWriteOptions(compression=compression)
        with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
            writer.write_table(table)
        r = post_arrow(client, bytes(sink.getvalue()))
        assert _error(r, 422, "invalid_input") == ["body"]
        assert "compressed" in r.json()["detail"][0]["message"]
    encoded = arrow_table(user_id=pa.array(USERS).dictionary_encode())
    assert _error(post_arrow(client, stream(encoded)), 422, "invalid_input") == ["body"]


def test_a_stream_of_several_batches_is_one_request(client: TestClient) -> None:
    table = arrow_table()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1)  # three record batches
    r = post_arrow(client, bytes(sink.getvalue()))
    assert r.status_code == 200, r.text
    assert pa.ipc.open_stream(r.content).read_all()["user_id"].to_pylist() == USERS


def test_limit_errors_say_the_same_in_every_format(client: TestClient) -> None:
    """Too many users or events reads the same whether rows, columns or Arrow carried them."""
    users = f"at most {MAX_USERS} users per batch request; split it"
    events = f"at most {MAX_EVENTS} events per user; 1 user(s) sent more"
    row = {"timestamp": "1997-09-01T00:00:00Z", "amount": 1.0, "quantity": 1}
    n = MAX_EVENTS + 1
    answers = [
        client.post("/predict/batch", json={"users": [{"user_id": "u"}] * (MAX_USERS + 1)}),
        post_arrow(
            client,
            stream(
                pa.table(
                    {
                        "user_id": [f"u{i}" for i in range(MAX_USERS + 1)],
                        "events": _events(*[[]] * (MAX_USERS + 1)),
                    }
                )
            ),
        ),
        client.post("/predict", json={"user_id": "u", "events": [row] * n}),
        client.post("/predict/batch", json={"users": [{"user_id": "u", "events": [row] * n}]}),
        client.post(
            "/predict/batch",
            json={
                "columns": {
                    "user_id": ["a"],
                    "offsets": [0, n],
                    "timestamp": [873072000] * n,
                    "amount": [1.0] * n,
                    "quantity": [1] * n,
                }
            },
        ),
        post_arrow(client, stream(pa.table({"user_id": ["a"], "events": _events([GOOD] * n)}))),
    ]
    said = [(r.json()["message"], [d["message"] for d in r.json()["detail"]]) for r in answers]
    assert (
        said
        == [(users, [f"more than {MAX_USERS} users"])] * 2
        + [(events, [f"more than {MAX_EVENTS} events"])] * 4
    )
