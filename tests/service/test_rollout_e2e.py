"""Shadow and canary models against a real ``python -m service`` process and real ONNX files.

Two models that give different probabilities for the same events stand in for the served model
and the candidate, so every answer can be checked against the version it names. The shadow must
leave every answer byte for byte as it was; the canary must answer exactly the users whose id
hashes into its share, on every request and after a restart; a promotion under load must fail no
request; bad admin requests must be refused with the serving models untouched.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.drift import ScoreReference
from service.rollout import in_canary
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

TOKEN = "rollout-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {
    "PI_ADMIN_TOKEN": TOKEN,
    "PI_DRIFT_INTERVAL_SECONDS": "0.2",
    "PI_DRIFT_MIN_SCORES": "10",
    "PI_OUTCOMES_FLUSH_SECONDS": "0.2",
}
EVENTS = [
    {"timestamp": "1997-09-01T00:00:00Z", "amount": 10.0, "quantity": 2},
    {"timestamp": "1997-08-11T00:00:00Z", "amount": 25.5, "quantity": 1},
]
REFERENCE = ScoreReference.of([k / 1000 for k in range(200, 800)])


def _user(user_id: str, n_events: int = 2) -> dict[str, Any]:
    return {"user_id": user_id, "as_of": "1997-09-30T00:00:00Z", "events": (EVENTS * 4)[:n_events]}


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {
        "model-a": write_model(
            tmp_path / "a.onnx", metadata=make_metadata(version="model-a", score_reference=REFERENCE), bias=-0.5
        ),
        "model-b": write_model(
            tmp_path / "b.onnx", metadata=make_metadata(version="model-b", score_reference=REFERENCE), bias=0.7
        ),
    }


@pytest.fixture
def server(models: dict[str, Path], tmp_path: Path) -> Iterator[ServiceProcess]:
    with running_service(models["model-a"], tmp_path / "service.log", env=ENV) as process:
        yield process


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def _value(client: httpx.Client, name: str, **labels: str) -> float:
    return _samples(client.get("/metrics").text, name).get(tuple(sorted(labels.items())), 0.0)


def _wait_for(client: httpx.Client, name: str, at_least: float, **labels: str) -> None:
    wait_until(
        lambda: _value(client, name, **labels) >= at_least or None,
        timeout=10,
        message=lambda: f"{name}{labels} stayed at {_value(client, name, **labels)}, below {at_least}",
    )


def _loaded(client: httpx.Client) -> list[tuple[str, str]]:
    return [(m["role"], m["model_version"]) for m in client.get("/v1/model").json()["loaded"]]


def _put(client: httpx.Client, role: str, **body: object) -> httpx.Response:
    return client.put(f"/admin/models/{role}", json=body, headers=AUTH)


def test_shadow_leaves_answers_unchanged_and_reports_its_difference(
    server: ServiceProcess, models: dict[str, Path]
) -> None:
    client = httpx.Client(base_url=server.url, timeout=30)
    singles = [_user(f"s-{i}", 1 + i % 5) for i in range(40)]
    batch = {"users": [_user(f"b-{i}", 1 + i % 7) for i in range(30)]}

    def answers() -> list[bytes]:
        return [client.post("/predict", json=u).content for u in singles]

    before = answers()
    before_batch = client.post("/predict/batch", json=batch).content
    # what model-b answers these users: served to all of them as a canary, then rolled back
    assert _put(client, "canary", model_path=str(models["model-b"]), percent=100).status_code == 200
    served_b = [client.post("/predict", json=u).json() for u in singles]
    assert {a["model_version"] for a in served_b} == {"model-b"}
    assert client.delete("/admin/models/canary", headers=AUTH).json()["unloaded_version"] == "model-b"

    r = _put(client, "shadow", model_path=str(models["model-b"]), sample=1.0)
    assert r.status_code == 200, r.text
    assert (r.json()["role"], r.json()["model_version"], r.json()["previous_version"]) == (
        "shadow",
        "model-b",
        None,
    )
    assert _loaded(client) == [("primary", "model-a"), ("shadow", "model-b")]
    assert client.get("/v1/model").json()["loaded"][1]["sample"] == 1.0

    assert answers() == before  # byte for byte: the shadow never touches an answer
    scored = "purchase_intent_shadow_calls_total"
    _wait_for(client, scored, len(singles), result="scored")
    difference = "purchase_intent_shadow_score_difference"
    assert _value(client, f"{difference}_count", model_version="model-b") == len(singles)
    differences = [b["probability"] - json_probability(a) for a, b in zip(before, served_b, strict=True)]
    assert min(differences) > 0.05  # model-b's bias is higher: the checks below compare something
    total = _value(client, f"{difference}_sum", model_version="model-b")
    assert total == pytest.approx(sum(abs(d) for d in differences), abs=1e-9)
    mean = _value(client, "purchase_intent_shadow_mean_score_difference", model_version="model-b")
    assert mean == pytest.approx(sum(differences) / len(differences), abs=1e-9)

    assert client.post("/predict/batch", json=batch).content == before_batch
    users = len(singles) + len(batch["users"])
    _wait_for(client, f"{difference}_count", users, model_version="model-b")
    assert _value(client, scored, result="dropped") == _value(client, scored, result="failed") == 0

    # its own drift and live-quality series, under its version
    window = "purchase_intent_score_window_size"
    _wait_for(client, window, users, model_version="model-b")
    performance = client.get("/v1/model/performance").json()
    assert "model-b" in [m["model_version"] for m in performance["models"]], performance
    assert _value(client, "purchase_intent_loaded_model_info", role="shadow", model_version="model-b") == 1

    assert client.delete("/admin/models/shadow", headers=AUTH).json() == {
        "role": "shadow",
        "unloaded_version": "model-b",
    }
    assert _loaded(client) == [("primary", "model-a")]
    metrics = client.get("/metrics").text
    assert not _samples(metrics, f"{difference}_count"), "an unloaded shadow keeps no difference series"
    assert not _samples(metrics, "purchase_intent_loaded_model_info").get(
        (("model_version", "model-b"), ("role", "shadow"))
    )
    assert answers() == before
    client.close()


def json_probability(answer: bytes) -> float:
    return float(httpx.Response(200, content=answer).json()["probability"])
