"""The service reports its own live accuracy: a replay of real CDNOW through a real server.

Every customer's purchases up to the cutoff go in through ``POST /events``; each customer of the
training run's ``scores.csv`` is predicted by id at the cutoff; then the holdout purchases go in,
and one purchase after the horizon moves the event clock past it. The live ROC AUC and Brier the
server reports equal the offline ones computed from ``scores.csv`` for the same users (the same
probabilities, the training run's labels), on SQLite and on a real redis-server. The replay is a
function so it can be run on the full CDNOW model too (bench/README.md has that run).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import roc_auc_score

from model_export.metrics import binary_metrics
from service.artifact import ModelMetadata
from service.quality import quality
from tests import waiting
from tests.conftest import TinyModel
from tests.service.processes import RedisProcess, running_redis, running_service

pytestmark = pytest.mark.slow

DAY = 86_400
#: Users per /predict/batch request and events per /events request: the service's default limits.
BATCH_USERS = 1000
EVENTS_PER_REQUEST = 5000


@dataclass(frozen=True)
class Offline:
    """The training run's answers: each test customer's probability and label at one ``as_of``."""

    as_of: str
    users: list[str]
    probabilities: list[float]
    labels: list[int]


def read_scores(path: Path) -> Offline:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    (as_of,) = {r["as_of"] for r in rows}
    return Offline(
        as_of,
        [r["user_id"] for r in rows],
        [float(r["probability"]) for r in rows],
        [int(r["label"]) for r in rows],
    )


def read_events(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as fh:
        return [
            {
                "event_id": f"row-{i}",
                "user_id": r["user_id"],
                "timestamp": r["timestamp"],
                "amount": float(r["amount"]),
                "quantity": int(r["quantity"]),
            }
            for i, r in enumerate(csv.DictReader(fh))
        ]


def _seconds(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())


def _ingest(client: httpx.Client, events: list[dict[str, Any]]) -> None:
    for start in range(0, len(events), EVENTS_PER_REQUEST):
        r = client.post("/events", json={"events": events[start : start + EVENTS_PER_REQUEST]})
        assert r.status_code == 200, r.text
        assert r.json()["duplicates"] == 0


def _gauge(client: httpx.Client, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@dataclass(frozen=True)
class Replayed:
    live: dict[str, Any]  # the model's "live" object from GET /v1/model/performance
    gauges: dict[str, float | None]
    served: list[float]  # the probabilities the server answered, in scores.csv order
    seconds: float


def replay(url: str, offline: Offline, events: list[dict[str, Any]], meta: ModelMetadata) -> Replayed:
    """Feed a running server (grace: one day) the log around ``offline.as_of`` and wait for its
    live figures."""
    started = time.monotonic()
    as_of = _seconds(offline.as_of)
    end = as_of + meta.horizon_days * DAY
    with httpx.Client(base_url=url, timeout=120) as client:
        _ingest(client, [e for e in events if _seconds(e["timestamp"]) <= as_of])
        served: list[float] = []
        for start in range(0, len(offline.users), BATCH_USERS):
            users = [
                {"user_id": u, "as_of": offline.as_of} for u in offline.users[start : start + BATCH_USERS]
            ]
            r = client.post("/predict/batch", json={"users": users})
            assert r.status_code == 200, r.text
            served += [p["probability"] for p in r.json()["predictions"]]
        recorded = {"result": "recorded"}
        waiting.wait_until(
            lambda: (
                _gauge(client, "purchase_intent_outcome_predictions_total", recorded) == len(offline.users)
            ),
            timeout=60,
            interval=0.2,
            message="the predictions were not all recorded",
        )
        _ingest(client, [e for e in events if _seconds(e["timestamp"]) > as_of])
        # time advances with the events: one purchase a horizon and the grace after as_of
        clock = datetime.fromtimestamp(end + DAY, UTC).isoformat().replace("+00:00", "Z")
        tick = {"event_id": "tick", "user_id": "clock", "timestamp": clock, "amount": 1.0, "quantity": 1}
        _ingest(client, [tick])

        def matured() -> dict[str, Any] | None:
            body = client.get("/v1/model/performance", params={"model_version": meta.model_version}).json()
            live: dict[str, Any] | None = body["models"][0]["live"]
            return live if live is not None and live["matured"] == len(offline.users) else None

        live = waiting.wait_until(matured, timeout=120, interval=0.2, message="the predictions never matured")
        version = {"model_version": meta.model_version}
        gauges = {
            name: _gauge(client, f"purchase_intent_live_{name}", version)
            for name in ("roc_auc", "brier_score", "log_loss", "base_rate", "matured_predictions")
        }
    return Replayed(live, gauges, served, time.monotonic() - started)


def check(offline: Offline, replayed: Replayed) -> dict[str, float]:
    """What both this test and the full-CDNOW run assert, and the figures to compare with offline.

    The server scores users in padded slices and the training run scored them in one call:
    onnxruntime may round a user one float32 step apart at another position in a batch, so served
    probabilities are checked to 1e-6 (as everywhere online is compared), and the live figures are
    checked exactly against the same measures of what was served with the training run's labels.
    """
    assert max(abs(a - b) for a, b in zip(replayed.served, offline.probabilities, strict=True)) <= 1e-6
    served = quality(offline.labels, replayed.served)
    live = replayed.live
    assert live["roc_auc"] == served.roc_auc
    assert live["brier"] == pytest.approx(served.brier, rel=0, abs=1e-15)  # a sum in another order
    assert live["log_loss"] == pytest.approx(served.log_loss, rel=0, abs=1e-15)
    assert (live["positives"], live["base_rate"]) == (served.positives, served.base_rate)
    assert [g["count"] for g in live["calibration"]] == [g.count for g in served.calibration]
    assert replayed.gauges["roc_auc"] == live["roc_auc"]
    assert replayed.gauges["brier_score"] == live["brier"]
    assert replayed.gauges["matured_predictions"] == len(offline.labels)
    want = binary_metrics(offline.labels, offline.probabilities, 0.5)
    return {
        "users": len(offline.labels),
        "differently_rounded": sum(
            a != b for a, b in zip(replayed.served, offline.probabilities, strict=True)
        ),
        "live_auc": live["roc_auc"],
        "offline_auc": want.roc_auc,
        "sklearn_auc": float(roc_auc_score(offline.labels, offline.probabilities)),
        "live_brier": live["brier"],
        "offline_brier": want.brier,
    }


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_live_accuracy_on_a_cdnow_replay_equals_the_offline_accuracy(
    tiny_model_dir: TinyModel, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    from model_export.export import read_metadata

    env = {
        "PI_STORE_BACKEND": backend,
        "PI_OUTCOMES_INTERVAL_SECONDS": "0.2",
        "PI_OUTCOMES_FLUSH_SECONDS": "0.1",
    }
    if backend == "redis":
        server: RedisProcess = request.getfixturevalue("redis_server")
        env |= {"PI_REDIS_URL": server.url, "PI_REDIS_KEY_PREFIX": f"replay-{tmp_path.name}:"}
    offline = read_scores(tiny_model_dir.scores)
    meta = read_metadata(tiny_model_dir.model)
    assert meta.score_reference is not None  # `train` writes the drift reference
    with running_service(tiny_model_dir.model, tmp_path / "service.log", env=env) as service:
        replayed = replay(service.url, offline, read_events(tiny_model_dir.events), meta)
    figures = check(offline, replayed)
    assert 0 < sum(offline.labels) < len(offline.labels)
    assert abs(figures["live_auc"] - figures["offline_auc"]) <= 1e-9
    assert abs(figures["live_auc"] - figures["sklearn_auc"]) <= 1e-9
    assert abs(figures["live_brier"] - figures["offline_brier"]) <= 1e-9
    print(f"replay ({backend}): {figures}, {replayed.seconds:.1f} s")
