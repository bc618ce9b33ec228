"""The JSON log formatter: one object per line, and its cached timestamp text is exactly
``datetime.isoformat(timespec="milliseconds")``, whichever second and rounding edge."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.logs import JsonFormatter


def test_timestamps_equal_isoformat_across_seconds_and_rounding_edges() -> None:
    formatter = JsonFormatter()
    rng = np.random.default_rng(3)
    base = 1_764_111_811
    instants = [float(t) for t in base + rng.random(20_000) * 10]  # many per second: the cache is hit
    instants += [base + 0.9999996, base + 0.0004999, base + 0.0005, float(base), base + 59.9995]
    for created in instants:
        assert formatter._ts(created) == datetime.fromtimestamp(created, tz=UTC).isoformat(
            timespec="milliseconds"
        ), created


def test_a_record_is_one_json_object_with_its_extra_fields() -> None:
    record = logging.makeLogRecord(
        {"name": "service.access", "levelno": logging.INFO, "levelname": "INFO", "msg": "request"}
    )
    record.status = 200
    record.route = "/predict"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    payload = json.loads(line)
    assert payload["level"] == "info"
    assert payload["logger"] == "service.access"
    assert payload["message"] == "request"
    assert payload["status"] == 200
    assert payload["route"] == "/predict"
    assert payload["ts"] == datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")


def test_values_json_cannot_encode_are_written_as_text_and_unicode_is_kept() -> None:
    record = logging.makeLogRecord({"name": "service", "levelno": logging.WARNING, "levelname": "WARNING"})
    record.msg = "café"
    record.path = Path("/models/m.onnx")
    record.cause = ValueError("bad")
    payload = json.loads(JsonFormatter().format(record))
    assert payload["message"] == "café"
    assert payload["path"] == "/models/m.onnx"
    assert payload["cause"] == "bad"
