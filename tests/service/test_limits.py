"""Limits through the app factory: body size, bounded concurrency (shedding), the queue timeout.

Requests are held inside the fake predictor with a gate, so "N requests in flight" is a fact of
the test, not a matter of timing. What needs a real socket (a body that never arrives, a chunked
body) is in ``test_hostile_e2e.py``.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.service.conftest import MAX_EVENTS, MAX_USERS, wait_ready
from tests.service.fakes import FakePredictor

J = {"Content-Type": "application/json"}
USER: dict[str, Any] = {
    "user_id": "u-1",
    "as_of": "1997-09-30T00:00:00Z",
    "events": [{"timestamp": "1997-09-01T00:00:00Z", "amount": 10.0, "quantity": 1}],
}


def _client(registry: CollectorRegistry, predictor: FakePredictor, **overrides: Any) -> TestClient:
    settings = Settings(
        providers=("CPUExecutionProvider",),
        max_batch_users=MAX_USERS,
        max_events_per_user=MAX_EVENTS,
        **overrides,
    )
    app = create_app(settings, predictor=predictor, registry=registry)
    return TestClient(app, raise_server_exceptions=False)


def _rejected(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("purchase_intent_rejected_requests_total", {"reason": reason})


def test_a_body_over_the_limit_is_a_413_and_never_scored(registry: CollectorRegistry) -> None:
    predictor = FakePredictor()
    with _client(registry, predictor, max_body_bytes=4096) as c:
        wait_ready(c)
        for path in ("/predict", "/predict/batch", "/nope"):
            r = c.post(path, content=b"x" * 4097, headers=J)
            assert r.status_code == 413, r.text
            assert r.json()["error"] == "body_too_large"
            assert "4096" in r.json()["message"]
        assert c.post("/predict", json=USER).status_code == 200  # under the limit: served
    assert predictor.calls == [1]
    assert _rejected(registry, "body_too_large") == 3


def test_load_above_the_concurrency_limit_is_shed_with_retry_after(registry: CollectorRegistry) -> None:
    """Two requests held in the model: the third is shed at once, probes still answer, and
    once the held ones finish the service serves at full rate again."""
    gate = threading.Event()
    predictor = FakePredictor(predict_gate=gate)
    with (
        _client(
            registry, predictor, max_concurrent_requests=2, batch_threads=2, inline_max_body_bytes=0
        ) as c,
        ThreadPoolExecutor(2) as pool,
    ):
        wait_ready(c)
        held = [pool.submit(c.post, "/predict", json=USER) for _ in range(2)]
        for _ in range(2):
            assert predictor.entered.acquire(timeout=10)
        shed = [c.post("/predict", json=USER), c.post("/predict/batch", json={"users": [USER]})]
        for r in shed:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"] == "overloaded"
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
        gate.set()
        assert [f.result(timeout=10).status_code for f in held] == [200, 200]
        assert [c.post("/predict", json=USER).status_code for _ in range(20)] == [200] * 20
    assert _rejected(registry, "overloaded") == 2


def test_a_request_that_cannot_get_a_worker_in_time_is_shed(registry: CollectorRegistry) -> None:
    gate = threading.Event()
    predictor = FakePredictor(predict_gate=gate)
    with (
        _client(
            registry, predictor, batch_threads=1, inline_max_body_bytes=0, request_timeout_seconds=0.3
        ) as c,
        ThreadPoolExecutor(1) as pool,
    ):
        wait_ready(c)
        held = pool.submit(c.post, "/predict", json=USER)
        assert predictor.entered.acquire(timeout=10)
        r = c.post("/predict", json=USER)  # waits 0.3 s for the one worker, then gives up
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "overloaded"
        assert r.headers["retry-after"] == "1"
        gate.set()
        assert held.result(timeout=10).status_code == 200  # the running one is never interrupted
    assert predictor.calls == [1]


def test_the_limits_are_in_the_openapi_responses(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/predict", "/predict/batch"):
        assert {"408", "413", "503"} <= set(paths[path]["post"]["responses"]), path


def test_refused_requests_give_their_admission_slot_back(registry: CollectorRegistry) -> None:
    """Every refusal path gives its slot back: after many errors, requests are still admitted."""
    with _client(registry, FakePredictor(), max_concurrent_requests=1, max_body_bytes=2048) as c:
        wait_ready(c)
        for body in (b"{", b"x" * 3000, b'{"user_id": 1}'):
            for _ in range(5):
                assert c.post("/predict", content=body, headers=J).status_code in (400, 413, 422)
        assert c.post("/predict", json=USER).status_code == 200
    assert _rejected(registry, "overloaded") == 0
