"""The request bodies every phase sends: one user with 20 events, and 1,000 such users in a batch.

Deterministic (a seeded generator), inside the CDNOW model's 39-week lookback before ``as_of``, and
valid under the service's strict schema, so every request takes the full path: parse, validate,
encode, score.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

AS_OF = datetime(1997, 9, 30, tzinfo=UTC)
EVENTS_PER_USER = 20
BATCH_USERS = 1000
_LOOKBACK_DAYS = 270


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_user(index: int, rng: np.random.Generator, events: int = EVENTS_PER_USER) -> dict[str, Any]:
    days = np.sort(rng.integers(0, _LOOKBACK_DAYS, size=events))
    amounts = np.round(rng.gamma(2.0, 15.0, size=events), 2)
    quantities = rng.integers(1, 6, size=events)
    return {
        "user_id": f"bench-{index}",
        "as_of": _rfc3339(AS_OF),
        "events": [
            {
                "timestamp": _rfc3339(AS_OF - timedelta(days=int(_LOOKBACK_DAYS - d), hours=int(d % 24))),
                "amount": float(a),
                "quantity": int(q),
            }
            for d, a, q in zip(days, amounts, quantities, strict=True)
        ],
    }


def predict_body(events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """A ``/predict`` body: one user with ``events`` purchases."""
    return json.dumps(make_user(0, np.random.default_rng(seed), events)).encode()


def batch_body(users: int = BATCH_USERS, events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """A ``/predict/batch`` body: ``users`` users with ``events`` purchases each."""
    rng = np.random.default_rng(seed)
    return json.dumps({"users": [make_user(i, rng, events) for i in range(users)]}).encode()


def by_id_body(seed: int = 0) -> bytes:
    """A ``/predict`` body naming the user of :func:`predict_body` without events (read from the store)."""
    user = make_user(0, np.random.default_rng(seed))
    return json.dumps({"user_id": user["user_id"], "as_of": user["as_of"]}).encode()


def events_body(events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """A ``/events`` body storing the events of :func:`predict_body`'s user."""
    user = make_user(0, np.random.default_rng(seed), events)
    return json.dumps({"events": [{"user_id": user["user_id"], **e} for e in user["events"]]}).encode()


def _epoch(text: str) -> int:
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


def _columns(users: int, events: int, seed: int) -> dict[str, Any]:
    """The same users as :func:`batch_body`, one list per field, timestamps as epoch seconds."""
    rng = np.random.default_rng(seed)
    rows = [make_user(i, rng, events) for i in range(users)]
    flat = [e for u in rows for e in u["events"]]
    return {
        "user_id": [u["user_id"] for u in rows],
        "as_of": [_epoch(u["as_of"]) for u in rows],
        "offsets": [events * i for i in range(users + 1)],
        "timestamp": [_epoch(e["timestamp"]) for e in flat],
        "amount": [e["amount"] for e in flat],
        "quantity": [e["quantity"] for e in flat],
    }


def columnar_body(users: int = BATCH_USERS, events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """The :func:`batch_body` users as a columnar JSON ``/predict/batch`` body (epoch seconds)."""
    return json.dumps({"columns": _columns(users, events, seed)}).encode()


def arrow_body(users: int = BATCH_USERS, events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """The :func:`batch_body` users as an Arrow IPC stream (needs pyarrow, the ``arrow`` extra)."""
    import pyarrow as pa
    import pyarrow.ipc  # the package does not import its ipc submodule

    c = _columns(users, events, seed)
    values = pa.StructArray.from_arrays(
        [
            pa.array(c["timestamp"], pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            pa.array(c["amount"], pa.float64()),
            pa.array(c["quantity"], pa.int64()),
        ],
        names=["timestamp", "amount", "quantity"],
    )
    table = pa.table(
        {
            "user_id": pa.array(c["user_id"], pa.string()),
            "as_of": pa.array(c["as_of"], pa.int64()).cast(pa.timestamp("s", tz="UTC")),
            "events": pa.ListArray.from_arrays(pa.array(c["offsets"], pa.int32()), values),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


#: The V2 (Open Inference Protocol) model that takes histories as columns, and its infer route.
V2_PATH = "/v2/models/purchase-intent/infer"
_V2_DATATYPES = {
    "user_id": "BYTES",
    "offsets": "INT64",
    "timestamp": "INT64",
    "amount": "FP64",
    "quantity": "INT64",
    "as_of": "INT64",
}


def v2_body(users: int = BATCH_USERS, events: int = EVENTS_PER_USER, seed: int = 0) -> bytes:
    """The :func:`batch_body` users as a V2 JSON inference request: the columns as tensors."""
    c = _columns(users, events, seed)
    inputs = [
        {"name": name, "shape": [len(c[name])], "datatype": kind, "data": c[name]}
        for name, kind in _V2_DATATYPES.items()
    ]
    return json.dumps({"inputs": inputs}).encode()


def v2_binary_body(
    users: int = BATCH_USERS, events: int = EVENTS_PER_USER, seed: int = 0
) -> tuple[bytes, int]:
    """The same request in Triton's binary tensor extension, as tritonclient sends it by default:
    the body and the length of its JSON part (the ``Inference-Header-Content-Length`` header)."""
    c = _columns(users, events, seed)
    raw = {
        "user_id": b"".join(struct.pack("<I", len(u)) + u.encode() for u in c["user_id"]),
        "amount": np.asarray(c["amount"], dtype="<f8").tobytes(),
        **{k: np.asarray(c[k], dtype="<i8").tobytes() for k in ("offsets", "timestamp", "quantity", "as_of")},
    }
    inputs = [
        {
            "name": name,
            "shape": [len(c[name])],
            "datatype": kind,
            "parameters": {"binary_data_size": len(raw[name])},
        }
        for name, kind in _V2_DATATYPES.items()
    ]
    head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    return head + b"".join(raw[name] for name in _V2_DATATYPES), len(head)
