"""``POST /admin/reload`` through the app factory: the token, refusals, and the atomic swap.

The first model is a gated fake (to hold a request in flight on it); the reloads load real
synthetic ONNX files through onnxruntime, exactly as in production.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.service.conftest import MAX_EVENTS, MAX_USERS, wait_ready
from tests.service.fakes import FakePredictor, make_metadata
from tests.service.onnx_models import write_model

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER: dict[str, Any] = {"user_id": "u-1", "as_of": "1997-09-30T00:00:00Z", "events": []}


def _client(
    registry: CollectorRegistry, predictor: FakePredictor, *, token: str | None = TOKEN, **extra: Any
) -> TestClient:
    settings = Settings(
        providers=("CPUExecutionProvider",),
        max_batch_users=MAX_USERS,
        max_events_per_user=MAX_EVENTS,
        admin_token=None if token is None else SecretStr(token),
        **extra,
    )
    return TestClient(
        create_app(settings, predictor=predictor, registry=registry), raise_server_exceptions=False
    )


def _reloads(registry: CollectorRegistry, result: str) -> float | None:
    return registry.get_sample_value("purchase_intent_model_reloads_total", {"result": result})


def test_without_a_token_setting_there_is_no_endpoint(registry: CollectorRegistry) -> None:
    with _client(registry, FakePredictor(), token=None) as c:
        wait_ready(c)
        r = c.post("/admin/reload", json={}, headers=AUTH)
        assert r.status_code == 404
        assert r.json()["error"] == "not_found"
        assert "/admin/reload" not in c.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["none", "wrong", "no scheme", "basic"],
)
def test_the_token_is_required(registry: CollectorRegistry, headers: dict[str, str], tmp_path: Path) -> None:
    good = write_model(tmp_path / "b.onnx", metadata=make_metadata(version="b"))
    with _client(registry, FakePredictor()) as c:
        wait_ready(c)
        r = c.post("/admin/reload", json={"model_path": str(good)}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in r.text
        assert c.get("/v1/model").json()["model_version"] == "fake-1"
    assert _reloads(registry, "success") == 0


def test_a_good_file_is_swapped_in(registry: CollectorRegistry, tmp_path: Path) -> None:
    good = write_model(tmp_path / "b.onnx", metadata=make_metadata(version="model-b"))
    with _client(registry, FakePredictor()) as c:
        wait_ready(c)
        r = c.post("/admin/reload", json={"model_path": str(good)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "model-b"
        assert r.json()["previous_version"] == "fake-1"
        assert r.json()["load_seconds"] > 0
        assert c.post("/predict", json=USER).json()["model_version"] == "model-b"
        assert c.get("/v1/model").json()["model_version"] == "model-b"
        assert c.get("/readyz").json()["model_version"] == "model-b"
        assert registry.get_sample_value("purchase_intent_ready") == 1
    assert _reloads(registry, "success") == 1
    assert registry.get_sample_value(
        "purchase_intent_model_info", {"model_version": "model-b", "provider": "CPUExecutionProvider"}
    )


def test_an_empty_body_reloads_the_configured_file(registry: CollectorRegistry, tmp_path: Path) -> None:
    configured = write_model(tmp_path / "m.onnx", metadata=make_metadata(version="configured"))
    with _client(registry, FakePredictor(), model_path=configured) as c:
        wait_ready(c)
        r = c.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "configured"


def _broken(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x01garbage")
    return {
        "missing": tmp_path / "nope.onnx",
        "corrupt": corrupt,
        "fixed batch": write_model(tmp_path / "fixed.onnx", batch=3),
        "wrong shape": write_model(tmp_path / "shape.onnx", shape=(5, 3)),
        "no metadata": write_model(tmp_path / "nometa.onnx", props={}),
    }


def test_a_bad_file_is_refused_and_the_old_model_keeps_serving(
    registry: CollectorRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = _broken(tmp_path)
    with _client(registry, FakePredictor()) as c, caplog.at_level(logging.ERROR, logger="service.lifecycle"):
        wait_ready(c)
        for name, path in broken.items():
            r = c.post("/admin/reload", json={"model_path": str(path)}, headers=AUTH)
            assert r.status_code == 422, (name, r.text)
            assert r.json()["error"] == "model_rejected"
            assert str(tmp_path) not in r.text, name  # the file name at most, never the directory
            assert "Traceback" not in r.text
            assert c.post("/predict", json=USER).json()["model_version"] == "fake-1"
            assert c.get("/readyz").status_code == 200
    assert _reloads(registry, "failure") == len(broken)
    assert _reloads(registry, "success") == 0
    refused = [r for r in caplog.records if r.getMessage().startswith("model reload refused")]
    assert len(refused) == len(broken)
    assert all(getattr(r, "model_path", "").startswith(str(tmp_path)) for r in refused)  # the log has it


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"model_path": "a\\u0000b"}', 422),
        (b'{"model_path": ""}', 422),
        (b'{"model_path": 5}', 422),
        (b'{"path": "x"}', 422),
        (b"{", 400),
        (b"\n", 400),  # not JSON; only a body of no bytes at all means "the configured file"
    ],
    ids=["nul byte", "empty", "number", "unknown field", "bad json", "whitespace"],
)
def test_bad_reload_bodies_are_4xx(registry: CollectorRegistry, body: bytes, status: int) -> None:
    with _client(registry, FakePredictor()) as c:
        wait_ready(c)
        r = c.post("/admin/reload", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == status, r.text


def test_requests_in_flight_finish_on_the_old_model(registry: CollectorRegistry, tmp_path: Path) -> None:
    gate = threading.Event()
    old = FakePredictor(version="old", predict_gate=gate)
    new = write_model(tmp_path / "new.onnx", metadata=make_metadata(version="new"))
    with _client(registry, old, inline_max_body_bytes=0) as c, ThreadPoolExecutor(1) as pool:
        wait_ready(c)
        held = pool.submit(c.post, "/predict", json=USER)
        assert old.entered.acquire(timeout=10)  # the request is inside the old model now
        r = c.post("/admin/reload", json={"model_path": str(new)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert c.post("/predict", json=USER).json()["model_version"] == "new"
        gate.set()
        answer = held.result(timeout=10)
    assert answer.status_code == 200
    assert answer.json()["model_version"] == "old"
