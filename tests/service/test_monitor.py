"""Live accuracy and drift through the app factory: a fake predictor, a real SQLite store, the
monitoring tasks on short intervals. What a user sees: ``GET /v1/model/performance`` and the
gauges on ``/metrics`` carry the numbers ``service.quality`` and ``service.drift`` give for the
same predictions, outcomes and reference."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.drift import ScoreReference, bin_counts, ks, psi
from service.quality import quality
from tests import waiting
from tests.service.conftest import MAX_USERS, wait_ready
from tests.service.fakes import FakePredictor, make_metadata

DAY = 86_400
AS_OF = int(datetime(1997, 9, 30, 23, 59, 59, tzinfo=UTC).timestamp())
HORIZON = 28 * DAY  # the fake model's 4 weeks
VERSION = "fake-1"
OFFLINE = {"test": {"roc_auc": 0.75, "brier": 0.125}, "n_test": 100}


def rfc3339(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "providers": ("CPUExecutionProvider",),
        "max_batch_users": MAX_USERS,
        "store_path": tmp_path / "events.sqlite3",
        "outcomes_interval_seconds": 0.05,
        "outcomes_flush_seconds": 0.05,
        "outcomes_grace_seconds": 0,
        "drift_interval_seconds": 0.05,
        "drift_min_scores": 5,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def reference() -> ScoreReference:
    return ScoreReference.of(np.linspace(0.45, 0.75, 2000))


def client_for(
    settings: Settings, reference: ScoreReference | None, registry: CollectorRegistry
) -> TestClient:
    # the offline figures where the exporter writes them
    meta = replace(make_metadata(version=VERSION, score_reference=reference), training_metrics=OFFLINE)
    app = create_app(settings, predictor=FakePredictor(metadata=meta, max_batch=MAX_USERS), registry=registry)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def api(tmp_path: Path, reference: ScoreReference, registry: CollectorRegistry) -> Iterator[TestClient]:
    with client_for(settings_for(tmp_path), reference, registry) as client:
        wait_ready(client)
        yield client


def event(user: str, t: int, amount: float = 10.0, quantity: int = 1) -> dict[str, Any]:
    return {"user_id": user, "timestamp": rfc3339(t), "amount": amount, "quantity": quantity}


def performance(client: TestClient, **params: str) -> dict[str, Any]:
    r = client.get("/v1/model/performance", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def model_of(body: dict[str, Any], version: str = VERSION) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in body["models"] if m["model_version"] == version)
    return found


def mature_predictions(client: TestClient, users: int = 4) -> dict[str, Any]:
    """Store purchases, predict by id at AS_OF, store what followed and a purchase past the horizon:
    returns the performance answer once they have matured (the drift window fills on the way)."""
    ids = [f"m{k}" for k in range(users)]
    before = [event(u, AS_OF - (k + 1) * 7 * DAY, 3.0 + k) for k, u in enumerate(ids)]
    assert client.post("/events", json={"events": before}).status_code == 200
    answer = client.post(
        "/predict/batch", json={"users": [{"user_id": u, "as_of": rfc3339(AS_OF)} for u in ids]}
    )
    assert answer.status_code == 200, answer.text
    waiting.wait_until(
        lambda: performance(client)["outcomes"]["unsettled"] >= users, timeout=10, message="not recorded"
    )
    after = [event(u, AS_OF + DAY) for u in ids[::2]] + [event("clock", AS_OF + HORIZON + DAY)]
    assert client.post("/events", json={"events": after}).status_code == 200

    def matured() -> dict[str, Any] | None:
        body = performance(client)
        return body if body["models"] and (model_of(body)["live"] or {}).get("matured") == users else None

    return waiting.wait_until(matured, timeout=10, message=lambda: f"nothing matured: {performance(client)}")


def test_matured_predictions_are_scored_against_the_purchases_that_followed(
    api: TestClient, registry: CollectorRegistry
) -> None:
    users = [f"u{k}" for k in range(8)]
    history = [event(u, AS_OF - (k + 1) * 9 * DAY, 5.0 + k, 1 + k % 3) for k, u in enumerate(users)]
    history += [event(u, AS_OF - 40 * DAY) for u in users[::3]]
    assert api.post("/events", json={"events": history}).status_code == 200
    answer = api.post(
        "/predict/batch", json={"users": [{"user_id": u, "as_of": rfc3339(AS_OF)} for u in users]}
    )
    assert answer.status_code == 200, answer.text
    probabilities = [p["probability"] for p in answer.json()["predictions"]]
    # the same users again, earlier that day: one prediction per user and day counts (the first)
    for u in users[:3]:
        again = api.post("/predict", json={"user_id": u, "as_of": rfc3339(AS_OF - 3600)})
        assert again.status_code == 200

    def recorded() -> list[float | None]:
        name = "purchase_intent_outcome_predictions_total"
        return [registry.get_sample_value(name, {"result": r}) for r in ("recorded", "duplicate", "dropped")]

    waiting.wait_until(
        lambda: recorded() == [8, 3, 0],
        timeout=10,
        message=lambda: f"recorded, duplicate, dropped: {recorded()}",
    )
    # outcomes: a purchase in (as_of, as_of + horizon], the last second included, or not
    bought = {"u0": AS_OF + 1, "u2": AS_OF + 5 * DAY, "u5": AS_OF + HORIZON, "u6": AS_OF + HORIZON + 1}
    labels = [1 if u in bought and bought[u] <= AS_OF + HORIZON else 0 for u in users]
    later = [event(u, t) for u, t in bought.items()] + [event("clock", AS_OF + HORIZON + 2 * DAY)]
    assert api.post("/events", json={"events": later}).status_code == 200
    body = waiting.wait_until(
        lambda: (b := performance(api))["models"] and (model_of(b)["live"] or {}).get("matured") == 8 and b,
        timeout=10,
        message=lambda: f"nothing matured: {performance(api)}",
    )
    want = quality(labels, probabilities)
    live = model_of(body)["live"]
    assert live["roc_auc"] == want.roc_auc
    assert live["brier"] == want.brier
    assert live["log_loss"] == want.log_loss
    assert (live["positives"], live["base_rate"]) == (3, 3 / 8)
    assert [g["count"] for g in live["calibration"]] == [g.count for g in want.calibration]
    assert body["outcomes"]["event_clock"] == rfc3339(AS_OF + HORIZON + 2 * DAY)
    assert body["outcomes"]["unsettled"] == 0
    labels_of = {"model_version": VERSION}
    assert registry.get_sample_value("purchase_intent_live_roc_auc", labels_of) == want.roc_auc
    assert registry.get_sample_value("purchase_intent_live_brier_score", labels_of) == want.brier
    assert registry.get_sample_value("purchase_intent_live_matured_predictions", labels_of) == 8
    assert registry.get_sample_value("purchase_intent_outcome_settled_total", {"outcome": "positive"}) == 3
    assert registry.get_sample_value("purchase_intent_model_offline_roc_auc", labels_of) == 0.75
    assert registry.get_sample_value("purchase_intent_model_offline_brier_score", labels_of) == 0.125
    assert model_of(body)["offline"] == {"roc_auc": 0.75, "brier": 0.125}
    decile = {"model_version": VERSION, "decile": "1"}
    assert registry.get_sample_value("purchase_intent_live_calibration_observed_rate", decile) == (
        want.calibration[0].observed_rate
    )


def test_nothing_matures_before_the_event_clock_passes_the_horizon(
    api: TestClient, registry: CollectorRegistry
) -> None:
    assert api.post("/events", json={"events": [event("u", AS_OF - DAY)]}).status_code == 200
    assert api.post("/predict", json={"user_id": "u", "as_of": rfc3339(AS_OF)}).status_code == 200
    waiting.wait_until(
        lambda: performance(api)["outcomes"]["unsettled"] == 1, timeout=10, message="never recorded"
    )
    # the wall clock is decades past the horizon; the events' clock is not
    assert api.post("/events", json={"events": [event("u", AS_OF + HORIZON - 1)]}).status_code == 200
    waiting.wait_until(
        lambda: performance(api)["outcomes"]["event_clock"] == rfc3339(AS_OF + HORIZON - 1),
        timeout=10,
        message="the clock did not move",
    )
    body = performance(api)
    assert model_of(body)["live"] is None
    assert (body["outcomes"]["unsettled"], body["outcomes"]["overdue"]) == (1, 1)
    assert registry.get_sample_value("purchase_intent_outcome_overdue_predictions") == 1
    assert (
        registry.get_sample_value("purchase_intent_live_matured_predictions", {"model_version": VERSION}) == 0
    )


def test_drift_compares_recent_scores_with_the_reference(
    api: TestClient, registry: CollectorRegistry, reference: ScoreReference
) -> None:
    rng = np.random.default_rng(3)
    scores: list[float] = []
    for batch in range(6):
        users = [
            {
                "user_id": f"d{batch}-{k}",
                "as_of": rfc3339(AS_OF),
                "events": [
                    {"timestamp": rfc3339(AS_OF - int(d) * DAY), "amount": 10.0, "quantity": 1}
                    for d in rng.integers(0, 60, rng.integers(0, 6))
                ],
            }
            for k in range(MAX_USERS)
        ]
        answer = api.post("/predict/batch", json={"users": users})
        assert answer.status_code == 200, answer.text
        scores += [p["probability"] for p in answer.json()["predictions"]]
    labels = {"model_version": VERSION}
    waiting.wait_until(
        lambda: registry.get_sample_value("purchase_intent_score_window_size", labels) == len(scores),
        timeout=10,
        message="the drift window did not fill",
    )
    served = np.asarray(scores, dtype=np.float32).astype(np.float64)
    waiting.wait_until(
        lambda: registry.get_sample_value("purchase_intent_score_psi", labels) == psi(reference, served),
        timeout=10,
        message="PSI never matched",
    )
    assert registry.get_sample_value("purchase_intent_score_ks", labels) == ks(reference, served)
    cumulative = np.cumsum(bin_counts(reference, served))
    edges = [*(repr(e) for e in reference.edges), "+Inf"]
    got = [
        registry.get_sample_value("purchase_intent_score_deciles_bucket", {**labels, "le": le})
        for le in edges
    ]
    assert got == [float(c) for c in cumulative]
    share = registry.get_sample_value(
        "purchase_intent_score_reference_proportion", {**labels, "upper": edges[1], "lower": edges[0]}
    )
    assert share == reference.proportions[1]
    drift = model_of(performance(api, model_version=VERSION))["drift"]
    assert drift == {
        "reference": True,
        "scores": len(scores),
        "psi": psi(reference, served),
        "ks": ks(reference, served),
    }


def test_a_model_without_a_reference_loads_and_reports_no_drift(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    with client_for(settings_for(tmp_path), None, registry) as client:
        wait_ready(client)
        for k in range(10):
            assert client.post("/predict", json={"user_id": f"u{k}", "events": []}).status_code == 200
        body = waiting.wait_until(
            lambda: (b := performance(client))["models"] and b,
            timeout=10,
            message="the version was not tracked",
        )
        assert model_of(body)["drift"] == {"reference": False, "scores": 0, "psi": None, "ks": None}
        text = client.get("/metrics").text
        assert "purchase_intent_score_psi{" not in text
        assert "purchase_intent_score_deciles_bucket{" not in text


def test_the_route_refuses_unknown_versions_and_bad_parameters(api: TestClient) -> None:
    r = api.get("/v1/model/performance", params={"model_version": "nope"})
    assert r.status_code == 404
    assert r.json()["error"] == "unknown_model_version"
    r = api.get("/v1/model/performance", params={"model_version": "x" * 300})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "query.model_version"
    waiting.wait_until(lambda: performance(api)["models"], timeout=10, message="never tracked")
    assert [m["model_version"] for m in performance(api, model_version=VERSION)["models"]] == [VERSION]


def test_outcomes_follow_the_event_store(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().records_outcomes
    assert not Settings(store_backend="none").records_outcomes
    assert not Settings(outcomes=False).records_outcomes
    with pytest.raises(ValidationError, match="outcomes need an event store"):
        Settings(store_backend="none", outcomes=True)


def test_without_a_store_drift_still_works_and_no_outcome_is_recorded(
    tmp_path: Path, reference: ScoreReference, registry: CollectorRegistry
) -> None:
    with client_for(settings_for(tmp_path, store_backend="none"), reference, registry) as client:
        wait_ready(client)
        for k in range(10):
            assert client.post("/predict", json={"user_id": f"u{k}", "events": []}).status_code == 200
        waiting.wait_until(
            lambda: (
                registry.get_sample_value("purchase_intent_score_window_size", {"model_version": VERSION})
                == 10
            ),
            timeout=10,
            message="no drift without a store",
        )
        body = performance(client)
        assert body["outcomes"]["enabled"] is False
        assert (
            registry.get_sample_value("purchase_intent_outcome_predictions_total", {"result": "recorded"})
            == 0
        )
        assert (
            registry.get_sample_value("purchase_intent_live_matured_predictions", {"model_version": VERSION})
            is None
        )


def test_compaction_keeps_the_raw_purchases_recorded_predictions_wait_for(tmp_path: Path) -> None:
    from service.store.upkeep import horizon, outcome_days
    from tests.service.fakes import SPEC

    now = 20_000 * DAY
    short = settings_for(tmp_path, store_retention_days=30, outcomes_grace_seconds=3600)
    assert outcome_days(short, 91) == 91 + 1 + 1  # the horizon, the grace in whole days, a day
    assert horizon(now, short, SPEC, outcome_days(short, 91))[0] == 20_000 - 93
    off = settings_for(tmp_path, store_retention_days=30, outcomes=False)
    assert horizon(now, off, SPEC, outcome_days(off, 91))[0] == 20_000 - 56  # the lookback decides


def test_a_retention_shorter_than_horizon_and_window_is_called_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from service.monitor import Monitor

    monitor = Monitor(settings_for(tmp_path, outcomes_retention_days=20), CollectorRegistry())
    with caplog.at_level("WARNING", logger="service.monitor"):
        monitor.track(make_metadata(version="short"))  # a 28-day horizon and a 28-day window
        monitor.track(make_metadata(version="short"))
    assert [r.getMessage() for r in caplog.records].count(
        "PI_OUTCOMES_RETENTION_DAYS is shorter than the model's horizon plus the outcome window: "
        "predictions are deleted before they can count"
    ) == 1
