"""The HTTP API through the app factory with a fake predictor: what a client sees."""

from __future__ import annotations

import logging
import re
import threading
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.features import encode_batch
from service.schemas import PredictResponse
from tests.service.conftest import MAX_USERS, wait_ready
from tests.service.fakes import SPEC, FakePredictor, reference_probability

AS_OF = "1997-09-30T00:00:00Z"
EVENTS: list[dict[str, Any]] = [
    {"timestamp": "1997-08-02T10:00:00Z", "amount": 29.33, "quantity": 2},
    {"timestamp": "1997-09-10T23:59:59+00:00", "amount": 12.49, "quantity": 1},
    {"timestamp": "1997-09-29T01:00:00+02:00", "amount": 57.0, "quantity": 4},  # 1997-09-28 UTC
]


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def expected(events: list[dict[str, Any]], as_of: str) -> float:
    """The probability the service must return: shared encoder + the fake's formula."""
    features = encode_batch(
        [_epoch(e["timestamp"]) for e in events],
        [e["amount"] for e in events],
        [e["quantity"] for e in events],
        [0, len(events)],
        _epoch(as_of),
        SPEC,
    )
    return float(reference_probability(features)[0])


def user(user_id: str = "u-1", events: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"user_id": user_id, "events": EVENTS if events is None else events, "as_of": AS_OF, **extra}


def test_predict_scores_with_the_shared_encoder_and_the_model_spec(client: TestClient) -> None:
    r = client.post("/predict", json=user())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["probability"] == pytest.approx(expected(EVENTS, AS_OF), abs=1e-7)
    assert body["user_id"] == "u-1"
    assert body["threshold"] == 0.5
    assert body["will_purchase"] == (body["probability"] >= 0.5)
    assert body["horizon_days"] == 28
    assert body["model_version"] == "fake-1"
    assert r.headers["content-type"] == "application/json"


def test_offsets_are_converted_to_utc_days(client: TestClient) -> None:
    """+02:00 on the 29th is the 28th in UTC; encoding the UTC instant gives the same answer."""
    shifted = [{**EVENTS[2], "timestamp": "1997-09-28T23:00:00Z"}]
    original = [EVENTS[2]]
    a = client.post("/predict", json=user(events=original)).json()["probability"]
    b = client.post("/predict", json=user(events=shifted)).json()["probability"]
    assert a == b


def test_events_after_as_of_are_ignored(client: TestClient) -> None:
    later = [*EVENTS, {"timestamp": "1997-09-30T00:00:01Z", "amount": 500.0, "quantity": 9}]
    a = client.post("/predict", json=user()).json()["probability"]
    b = client.post("/predict", json=user(events=later)).json()["probability"]
    assert a == b


def test_as_of_defaults_to_now(client: TestClient) -> None:
    now = datetime.now(UTC)
    recent = [{"timestamp": (now - timedelta(days=3)).isoformat(), "amount": 10.0, "quantity": 1}]
    body = {"user_id": "u-now", "events": recent}
    got = client.post("/predict", json=body).json()["probability"]
    # three days ago vs now: the purchase is in the newest bin whatever the exact second
    assert got == pytest.approx(expected(recent, now.isoformat()), abs=1e-7)


def test_batch_is_one_inference_call_in_request_order(client: TestClient, predictor: FakePredictor) -> None:
    users = [
        user("a"),
        user("b", events=[]),
        user("c", events=EVENTS[:1]),
        user("a", events=EVENTS[1:]),  # duplicate ids are scored independently
    ]
    predictor.calls.clear()
    r = client.post("/predict/batch", json={"users": users})
    assert r.status_code == 200, r.text
    assert predictor.calls == [4]
    body = r.json()
    assert body["model_version"] == "fake-1"
    assert [p["user_id"] for p in body["predictions"]] == ["a", "b", "c", "a"]
    singles = [client.post("/predict", json=u).json()["probability"] for u in users]
    assert [p["probability"] for p in body["predictions"]] == singles
    assert all(p["will_purchase"] == (p["probability"] >= body["threshold"]) for p in body["predictions"])


def test_large_bodies_are_scored_off_the_event_loop(registry: CollectorRegistry) -> None:
    """Same answers either way; a body above the inline limit runs in a worker thread."""
    predictor = FakePredictor(max_batch=MAX_USERS)
    app = create_app(
        Settings(max_batch_users=MAX_USERS, inline_max_body_bytes=100), predictor=predictor, registry=registry
    )
    with TestClient(app) as c:
        wait_ready(c)
        loop_thread = c.portal.call(threading.get_ident)  # type: ignore[union-attr]
        small = c.post("/predict", json={"user_id": "s", "events": []})
        large = c.post("/predict", json=user())
    assert small.status_code == large.status_code == 200
    assert predictor.threads[-2] == loop_thread
    assert predictor.threads[-1] != loop_thread
    assert large.json()["probability"] == pytest.approx(expected(EVENTS, AS_OF), abs=1e-7)


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    r = client.post("/predict", json=user(), headers={"X-Request-ID": "trace-42.a:b"})
    assert r.headers["x-request-id"] == "trace-42.a:b"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    assert int(generated, 16) >= 0
    hostile = client.get("/healthz", headers={"X-Request-ID": "x" * 500}).headers["x-request-id"]
    assert hostile != "x" * 500


def test_one_json_log_line_per_request_and_none_for_probes(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.access"):
        client.get("/healthz")
        client.get("/readyz")
        client.get("/metrics")
        client.post("/predict", json=user(), headers={"X-Request-ID": "req-1"})
        client.post("/predict", content=b"{", headers={"Content-Type": "application/json"})
    records = [r for r in caplog.records if r.name == "service.access"]
    assert [r.__dict__["path"] for r in records] == ["/predict", "/predict"]
    first = records[0].__dict__
    assert first["method"] == "POST"
    assert first["status"] == 200
    assert first["route"] == "/predict"
    assert first["request_id"] == "req-1"
    assert first["model_version"] == "fake-1"
    assert 0 < first["duration_seconds"] < 5
    assert records[1].__dict__["status"] == 400


def test_healthz_readyz_and_model(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "status": "ready",
        "reason": None,
        "model_version": "fake-1",
        "provider": "CPUExecutionProvider",
        "provider_fallback": False,
        "store": "ok",
    }
    model = client.get("/v1/model").json()
    assert model["model_version"] == "fake-1"
    assert model["feature_spec"]["lookback_bins"] == SPEC.lookback_bins
    assert model["feature_spec"]["channels"] == list(SPEC.channels)
    assert model["threshold"] == 0.5
    assert model["horizon_days"] == 28
    assert model["training_metrics"] == {"roc_auc": 0.5}
    assert model["runtime"]["provider"] == "CPUExecutionProvider"
    assert model["runtime"]["batch_sizes"] == [1, 2, 4, 8]


def test_not_ready_until_warm_up_finishes(settings: Settings, registry: CollectorRegistry) -> None:
    gate = threading.Event()
    app = create_app(settings, predictor=FakePredictor(gate=gate), registry=registry)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200  # liveness never waits on the model
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "loading"
        assert r.json()["reason"]
        p = c.post("/predict", json=user())
        assert p.status_code == 503
        assert p.json()["error"] == "not_ready"
        assert p.headers["retry-after"] == "1"
        assert c.get("/v1/model").status_code == 503
        assert registry.get_sample_value("purchase_intent_ready") == 0
        gate.set()
        wait_ready(c)
        assert c.post("/predict", json=user()).status_code == 200
        assert registry.get_sample_value("purchase_intent_ready") == 1


def test_a_model_that_fails_to_load_is_reported_not_ready(registry: CollectorRegistry) -> None:
    failures: list[str] = []
    app = create_app(Settings(), registry=registry, on_load_failure=failures.append)  # no model path
    with TestClient(app) as c:
        for _ in range(200):
            if failures:
                break
            threading.Event().wait(0.01)
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "failed"
        assert c.get("/healthz").status_code == 200
    assert failures
    assert "no model configured" in failures[0]


def test_unexpected_errors_are_a_bare_500(settings: Settings, registry: CollectorRegistry) -> None:
    secret = "boom at /srv/secret/path.py line 3"
    app = create_app(settings, predictor=FakePredictor(error=RuntimeError(secret)), registry=registry)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        r = c.post("/predict", json=user())
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "internal server error", "detail": []}
    assert "secret" not in r.text
    assert "Traceback" not in r.text
    assert r.headers["x-request-id"]
    assert (
        registry.get_sample_value("purchase_intent_rejected_requests_total", {"reason": "internal_error"})
        == 1
    )
    assert (
        registry.get_sample_value(
            "purchase_intent_requests_total", {"route": "/predict", "status_class": "5xx"}
        )
        == 1
    )


def test_provider_fallback_is_visible(settings: Settings, registry: CollectorRegistry) -> None:
    fake = FakePredictor(
        requested=("CUDAExecutionProvider", "CPUExecutionProvider"), active=("CPUExecutionProvider",)
    )
    with TestClient(create_app(settings, predictor=fake, registry=registry)) as c:
        wait_ready(c)
        ready = c.get("/readyz").json()
        runtime = c.get("/v1/model").json()["runtime"]
    assert ready["provider"] == "CPUExecutionProvider"
    assert ready["provider_fallback"] is True
    assert runtime["requested_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime["provider_fallback"] is True
    assert registry.get_sample_value("purchase_intent_model_provider_fallback") == 1
    info = {"model_version": "fake-1", "provider": "CPUExecutionProvider"}
    assert registry.get_sample_value("purchase_intent_model_info", info) == 1


def test_metrics_count_what_happened(client: TestClient, registry: CollectorRegistry) -> None:
    client.post("/predict", json=user())
    client.post("/predict/batch", json={"users": [user("a"), user("b"), user("c")]})
    client.post("/predict", json={"events": []})  # 422: no user_id
    for path in ("/wp-admin", "/u/12345", "/.env"):
        client.get(path)
    text = client.get("/metrics").text

    def value(name: str, labels: dict[str, str] | None = None) -> float | None:
        return registry.get_sample_value(name, labels or {})

    assert value("purchase_intent_users_scored_total") == 4
    assert value("purchase_intent_batch_size_count") == 2
    assert value("purchase_intent_batch_size_sum") == 4
    assert value("purchase_intent_predicted_probability_count") == 4
    assert value("purchase_intent_predicted_probability_bucket", {"le": "+Inf"}) == 4
    assert value("purchase_intent_inference_duration_seconds_count") == 2
    assert value("purchase_intent_encoding_duration_seconds_count") == 2
    assert value("purchase_intent_requests_total", {"route": "/predict", "status_class": "2xx"}) == 1
    assert value("purchase_intent_requests_total", {"route": "/predict", "status_class": "4xx"}) == 1
    assert value("purchase_intent_requests_total", {"route": "/predict/batch", "status_class": "2xx"}) == 1
    assert value("purchase_intent_requests_total", {"route": "unmatched", "status_class": "4xx"}) == 3
    assert value("purchase_intent_request_duration_seconds_count", {"route": "/predict"}) == 2
    assert value("purchase_intent_rejected_requests_total", {"reason": "invalid_input"}) == 1
    assert value("purchase_intent_rejected_requests_total", {"reason": "not_found"}) == 3
    assert value("purchase_intent_rejected_requests_total", {"reason": "too_many_users"}) == 0
    assert "purchase_intent_requests_in_flight 1.0" in text  # the /metrics request itself
    assert value("purchase_intent_requests_in_flight") == 0
    assert value("purchase_intent_ready") == 1
    assert (
        value("purchase_intent_model_info", {"model_version": "fake-1", "provider": "CPUExecutionProvider"})
        == 1
    )
    assert (value("purchase_intent_model_load_duration_seconds") or -1) >= 0
    # no raw paths, no user ids in any label (label sets only: a sample value may hold any digits)
    labels = " ".join(re.findall(r"\{[^}]*\}", text))
    for leaked in ("wp-admin", "12345", ".env", 'user_id="'):
        assert leaked not in labels


def test_metrics_is_a_plain_route(client: TestClient) -> None:
    r = client.get("/metrics", follow_redirects=False)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_probability_histogram_buckets_are_cumulative(
    client: TestClient, registry: CollectorRegistry
) -> None:
    client.post(
        "/predict/batch", json={"users": [user(str(i), events=EVENTS[: i % 4]) for i in range(MAX_USERS)]}
    )
    buckets = [
        registry.get_sample_value("purchase_intent_predicted_probability_bucket", {"le": le})
        for le in ("0.05", "0.5", "0.95", "1.0", "+Inf")
    ]
    assert buckets == sorted(buckets)  # type: ignore[type-var]
    assert buckets[-1] == MAX_USERS
    total = registry.get_sample_value("purchase_intent_predicted_probability_sum")
    assert total is not None
    assert 0 < total < MAX_USERS


def test_openapi_documents_every_endpoint_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) == {
        "/predict",
        "/predict/batch",
        "/events",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/model",
        "/v1/model/performance",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/versions/{version}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    }
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        infer = paths[path]["post"]
        ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] == "InferenceRequest"
        assert {"400", "404", "413", "415", "422", "503"} <= set(infer["responses"])
        assert "application/octet-stream" in infer["responses"]["200"]["content"]
    for path in ("/predict", "/predict/batch"):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]
        refs = [s["$ref"] for s in body["schema"].get("oneOf", [body["schema"]])]
        for ref in refs:
            assert ref.rsplit("/", 1)[-1] in spec["components"]["schemas"]
        assert body["examples"]
        assert {"400", "415", "422", "503"} <= set(paths[path]["post"]["responses"])
    assert "413" in paths["/predict/batch"]["post"]["responses"]
    schemas = spec["components"]["schemas"]
    for name in (
        "PredictResponse",
        "BatchPredictResponse",
        "ReadinessResponse",
        "ModelResponse",
        "HealthResponse",
    ):
        assert schemas[name]["examples"], name
    assert "Event" in schemas
    assert "$defs" not in schemas["PredictRequest"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


def test_the_openapi_version_is_the_one_in_pyproject(client: TestClient) -> None:
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    written = tomllib.loads(pyproject.read_text())["project"]["version"]
    served = client.get("/openapi.json").json()["info"]["version"]
    assert served == written, "the installed package is older than pyproject.toml: run make env"


def test_the_example_requests_in_the_docs_are_accepted(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/predict", "/predict/batch"):
        examples = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]
        for example in examples.values():
            r = client.post(path, json=example["value"])
            assert r.status_code == 200, (path, r.text)
    example_user = spec["components"]["schemas"]["PredictRequest"]["examples"][0]
    assert client.post("/predict", json=example_user).status_code == 200
    (inference,) = spec["components"]["schemas"]["InferenceRequest"]["examples"]
    r = client.post("/v2/models/purchase-intent/infer", json=inference)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == inference["id"]


def test_probabilities_are_float32_values(client: TestClient) -> None:
    p = client.post("/predict", json=user()).json()["probability"]
    assert float(np.float32(p)) == p


def test_the_fastapi_declaration_of_predict_answers_as_the_direct_route(settings: Settings) -> None:
    """The app answers /predict without FastAPI's router; the declared route (what OpenAPI shows)
    runs the same code. Served through FastAPI alone, both give the same answers and errors."""

    def fresh() -> FastAPI:
        return create_app(
            settings, predictor=FakePredictor(max_batch=MAX_USERS), registry=CollectorRegistry()
        )

    other = fresh()

    async def through_fastapi(scope: Any, receive: Any, send: Any) -> None:
        await FastAPI.__call__(other, scope, receive, send)  # skips ServiceApp's direct route

    bodies: list[dict[str, Any]] = [
        user(),
        user(events=[]),
        user(events=[{"timestamp": "1997-09-01T00:00:00", "amount": 1.0, "quantity": 1}]),  # no offset
        {"events": []},  # no user_id
    ]
    answers = []
    for target in (fresh(), through_fastapi):
        with TestClient(target, raise_server_exceptions=False) as c:
            wait_ready(c)
            responses = [c.post("/predict", json=b) for b in bodies]
            responses.append(c.post("/predict", content=b"{", headers={"Content-Type": "application/json"}))
            responses.append(c.post("/predict", content=b"{}", headers={"Content-Type": "text/plain"}))
            answers.append([(r.status_code, r.json()) for r in responses])
    assert [status for status, _ in answers[0]] == [200, 200, 422, 422, 400, 415]
    assert answers[0] == answers[1]


def test_the_predict_answer_is_exactly_the_response_model_serialised(client: TestClient) -> None:
    for body in (user(), user(user_id='quote " and \u00e9', events=[])):
        raw = client.post("/predict", json=body).content
        assert PredictResponse.model_validate_json(raw).model_dump_json().encode() == raw
