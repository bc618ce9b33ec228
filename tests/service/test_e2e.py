"""End to end: a real ``python -m service`` (uvicorn) process serving the real tiny CDNOW model.

The parity test is the product's central promise: for real customers, the online probability at a
given ``as_of`` equals the offline onnxruntime score the training run wrote, because both sides
call the same encoder with the model's own feature spec.
"""

from __future__ import annotations

import asyncio
import csv
import math
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client, Columns, Event, StoredEvent, User
from service.config import Settings
from service.features import encode_batch
from service.predictor import OnnxPredictor
from service.schemas import PredictResponse
from tests import waiting
from tests.conftest import TinyModel
from tests.service.processes import (
    ServiceProcess,
    require_binary,
    running_prometheus,
    running_service,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_model_dir: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("service") / "service.log"
    with running_service(tiny_model_dir.model, log) as proc:
        yield proc


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def offline(tiny_model_dir: TinyModel) -> list[dict[str, Any]]:
    """Each scored test customer as a /predict body, with the offline probability beside it."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _read_csv(tiny_model_dir.events):
        events[row["user_id"]].append(
            {"timestamp": row["timestamp"], "amount": float(row["amount"]), "quantity": int(row["quantity"])}
        )
    users = []
    for row in _read_csv(tiny_model_dir.scores):
        body = {"user_id": row["user_id"], "as_of": row["as_of"], "events": events[row["user_id"]]}
        users.append({"body": body, "probability": float(row["probability"])})
    assert len(users) >= 50, "the tiny model's scores.csv should hold a real test split"
    return users


def _user(body: dict[str, Any]) -> User:
    events = [Event(e["timestamp"], e["amount"], e["quantity"]) for e in body.get("events") or ()]
    return User(body["user_id"], events if "events" in body else None, body["as_of"])


def test_ready_reports_version_and_provider(server: ServiceProcess, tiny_model_dir: TinyModel) -> None:
    with Client(server.url) as client:
        ready = client.wait_ready(timeout=10)
        model = client.model_info()
    assert ready.raw["provider"] == "CPUExecutionProvider"
    assert ready.raw["provider_fallback"] is False
    assert ready.model_version == model.model_version
    lookback = model.feature_spec["lookback_bins"]
    assert lookback == 39  # what the tiny model was trained with (tests/conftest.py)
    assert model.raw["runtime"]["active_providers"][0] == "CPUExecutionProvider"
    assert 0.0 <= model.threshold <= 1.0


def test_online_scores_equal_offline_scores(server: ServiceProcess, offline: list[dict[str, Any]]) -> None:
    want = np.array([u["probability"] for u in offline], dtype=np.float64)
    users = [_user(u["body"]) for u in offline]
    with Client(server.url, timeout=60) as client:
        got_arr = _probabilities(client, users)
        singles = [client.predict(u).probability for u in users[:25]]
        columns = np.concatenate(
            [
                client.predict_columns(Columns.from_users(users[start : start + 500])).probability
                for start in range(0, len(users), 500)
            ]
        )
    np.testing.assert_allclose(got_arr, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(singles), want[:25], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(columns, got_arr)  # columns and rows: the same float32
    exact = float(np.mean(np.float32(got_arr) == np.float32(want)))
    assert exact > 0.99, f"only {exact:.1%} float32-identical"


def test_v2_inference_equals_the_batch_answer_on_the_real_model(
    server: ServiceProcess, offline: list[dict[str, Any]]
) -> None:
    """The real tiny CDNOW model through the Open Inference Protocol: tritonclient's binary
    request answers the columnar /predict/batch's float32, bit for bit."""
    users = [_user(u["body"]) for u in offline[:200]]
    columns = Columns.from_users(users)
    with Client(server.url, timeout=60) as client:
        expected = np.asarray(client.predict_columns(columns).probability, dtype=np.float32)
    epoch = [int(datetime.fromisoformat(str(t)).timestamp()) for t in columns.timestamp]
    as_of = [int(datetime.fromisoformat(str(t)).timestamp()) for t in columns.as_of or ()]
    tensors = {
        "user_id": ("BYTES", np.array([u.encode() for u in columns.user_id], dtype=np.object_)),
        "offsets": ("INT64", np.asarray(columns.offsets, dtype=np.int64)),
        "timestamp": ("INT64", np.asarray(epoch, dtype=np.int64)),
        "amount": ("FP64", np.asarray(columns.amount, dtype=np.float64)),
        "quantity": ("INT64", np.asarray(columns.quantity, dtype=np.int64)),
        "as_of": ("INT64", np.asarray(as_of, dtype=np.int64)),
    }
    inputs = []
    for name, (kind, values) in tensors.items():
        tensor = triton.InferInput(name, list(values.shape), kind)
        tensor.set_data_from_numpy(values, binary_data=True)
        inputs.append(tensor)
    v2 = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        got = v2.infer("purchase-intent", inputs).as_numpy("probability")
    finally:
        v2.close()
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.fixture(scope="module")
def raw_offline(tiny_model_dir: TinyModel) -> list[dict[str, Any]]:
    """Each scored test customer with their rows of the raw CSV slice, as the CLI read them (exact
    duplicates and several rows a day included), and the offline probability."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _read_csv(tiny_model_dir.raw):  # timestamps are dates: midnight UTC
        events[row["user_id"]].append(
            {
                "timestamp": f"{row['timestamp']}T00:00:00Z",
                "amount": float(row["amount"]),
                "quantity": int(row["quantity"]),
            }
        )
    return [
        {
            "body": {"user_id": row["user_id"], "as_of": row["as_of"], "events": events[row["user_id"]]},
            "probability": float(row["probability"]),
        }
        for row in _read_csv(tiny_model_dir.scores)
    ]


def _general_path(predictor: OnnxPredictor, body: dict[str, Any]) -> float:
    """One user's probability the way every batch is scored: ``encode_batch`` on columns with
    ``math.floor(timestamp())`` seconds, then the session at batch size one."""
    as_of = math.floor(datetime.fromisoformat(body["as_of"]).timestamp())
    events = body["events"]
    ts = [math.floor(datetime.fromisoformat(e["timestamp"]).timestamp()) for e in events]
    features = encode_batch(
        np.array(ts, dtype=np.int64),
        np.array([e["amount"] for e in events], dtype=np.float64),
        np.array([e["quantity"] for e in events], dtype=np.float64),
        [0, len(events)],
        as_of,
        predictor.metadata.feature_spec,
    )
    return float(predictor.predict(features)[0])


def test_a_lone_request_answers_as_the_general_path_bit_for_bit(
    server: ServiceProcess,
    tiny_model_dir: TinyModel,
    offline: list[dict[str, Any]],
    raw_offline: list[dict[str, Any]],
) -> None:
    """A lone ``/predict`` (one user, nothing else in flight: the one-user encoder, no batcher)
    gives the float32 of the batch encoder and a batch-one session on the same file, and the
    answer's bytes are the response model's; raw rows with duplicates, a user without history and
    a user whose events all follow ``as_of`` included."""
    raw = [u["body"] for u in raw_offline if _repeats(u["body"]) != (0, 0)][:40]
    bodies = [u["body"] for u in offline[:80]] + raw
    bodies += [{"user_id": "nobody", "events": [], "as_of": "1998-01-01T00:00:00Z"}]
    bodies += [{**raw[0], "user_id": "later", "as_of": "1997-01-01T12:00:00+05:30"}]
    predictor = OnnxPredictor.load(tiny_model_dir.model, Settings())
    meta = predictor.metadata
    with httpx.Client(base_url=server.url, timeout=60) as client:
        alone = [client.post("/predict", json=body) for body in bodies]
    for body, single in zip(bodies, alone, strict=True):
        probability = _general_path(predictor, body)
        want = PredictResponse(
            user_id=body["user_id"],
            probability=probability,
            will_purchase=probability >= meta.threshold,
            threshold=meta.threshold,
            horizon_days=meta.horizon_days,
            model_version=meta.model_version,
        )
        assert single.status_code == 200
        assert single.json()["probability"] == probability, body["user_id"]
        assert single.content == want.model_dump_json().encode()


def _repeats(body: dict[str, Any]) -> tuple[int, int]:
    """(exact duplicates, further rows of a day) among a user's events up to ``as_of``."""
    seen = [e for e in body["events"] if e["timestamp"] <= body["as_of"]]
    rows = {(e["timestamp"], e["amount"], e["quantity"]) for e in seen}
    days = {e["timestamp"][:10] for e in seen}
    return len(seen) - len(rows), len(rows) - len(days)


def _probabilities(client: Client, users: list[User]) -> np.ndarray:
    got: list[float] = []
    for start in range(0, len(users), 500):
        chunk = users[start : start + 500]
        answer = client.predict_batch(chunk)
        assert answer.user_id == [u.user_id for u in chunk]
        got.extend(answer.probability)
    return np.array(got, dtype=np.float64)


def test_raw_rows_score_like_training(server: ServiceProcess, raw_offline: list[dict[str, Any]]) -> None:
    """Every test user's raw rows sent inline as they are: the service counts them by training's
    cleaning rule (a repeated row once, a day's rows as one purchase day) and gives scores.csv."""
    repeats = np.array([_repeats(u["body"]) for u in raw_offline])
    assert repeats[:, 0].sum() > 0, "the test users' raw rows should hold exact duplicates"
    assert repeats[:, 1].sum() > 0, "the test users' raw rows should hold several rows a day"
    want = np.array([u["probability"] for u in raw_offline])
    with Client(server.url, timeout=60) as client:
        got = _probabilities(client, [_user(u["body"]) for u in raw_offline])
        twice = [u for u, (dup, _) in zip(raw_offline, repeats, strict=True) if dup][:10]
        singles = [client.predict(_user(u["body"])).probability for u in twice]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(singles, [u["probability"] for u in twice], rtol=0, atol=1e-6)


def test_stored_raw_rows_under_distinct_ids_score_like_inline(
    server: ServiceProcess, raw_offline: list[dict[str, Any]]
) -> None:
    """The same raw rows through ``POST /events``, each under its own event id (so the store keeps
    every copy), then scored by user id: the probability is the inline one, and training's."""
    users = [u for u in raw_offline if _repeats(u["body"])[0]][:20]
    assert users, "the test users' raw rows should hold exact duplicates"
    ingest = [
        StoredEvent(
            u["body"]["user_id"], e["timestamp"], e["amount"], e["quantity"], f"{u['body']['user_id']}-{k}"
        )
        for u in users
        for k, e in enumerate(u["body"]["events"])
    ]
    want = np.array([u["probability"] for u in users])
    with Client(server.url, timeout=60) as client:
        stored = client.send_events(ingest)
        assert (stored.stored, stored.duplicates) == (len(ingest), 0)
        by_id = [User(u["body"]["user_id"], as_of=u["body"]["as_of"]) for u in users]
        got = _probabilities(client, by_id)
        inline = _probabilities(client, [_user(u["body"]) for u in users])
        single = client.predict(by_id[0]).probability
    np.testing.assert_allclose(got, inline, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert single == pytest.approx(want[0], abs=1e-6)


def test_request_log_is_json_with_the_request_id(
    server: ServiceProcess, offline: list[dict[str, Any]]
) -> None:
    httpx.get(f"{server.url}/healthz")
    r = httpx.post(f"{server.url}/predict", json=offline[0]["body"], headers={"X-Request-ID": "e2e-log-1"})
    assert r.headers["x-request-id"] == "e2e-log-1"
    version = r.json()["model_version"]
    mine = waiting.wait_until(
        lambda: [x for x in server.log_lines() if x.get("request_id") == "e2e-log-1"],
        timeout=5,
        interval=0.05,
        message="no access log line for request e2e-log-1",
    )
    lines = server.log_lines()  # every line must parse as JSON
    assert len(mine) == 1
    assert mine[0] | {"duration_seconds": 0, "ts": ""} == {
        "ts": "",
        "level": "info",
        "logger": "service.access",
        "message": "request",
        "method": "POST",
        "path": "/predict",
        "route": "/predict",
        "status": 200,
        "duration_seconds": 0,
        "model_version": version,
        "request_id": "e2e-log-1",
    }
    assert not [x for x in lines if x.get("path") in ("/healthz", "/readyz", "/metrics")]
    assert any(x.get("message") == "model ready" for x in lines)


def test_metrics_pass_promtool(server: ServiceProcess, offline: list[dict[str, Any]]) -> None:
    promtool = require_binary("promtool")
    httpx.post(f"{server.url}/predict", json=offline[0]["body"])
    httpx.post(f"{server.url}/predict", content=b"{", headers={"Content-Type": "application/json"})
    # every family present, the drift ones included (filled by the monitor's first round): a
    # label promtool refuses on one of them must not pass because the scrape came too early
    deadline = time.monotonic() + 30
    text = httpx.get(f"{server.url}/metrics").text
    while "purchase_intent_score_reference_proportion{" not in text:
        assert time.monotonic() < deadline, "no drift reference series in /metrics"
        time.sleep(0.2)
        text = httpx.get(f"{server.url}/metrics").text
    assert "purchase_intent_model_info{" in text
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == "", check.stdout + check.stderr
    assert check.stderr.strip() == "", check.stdout + check.stderr


def test_prometheus_scrapes_the_service(
    server: ServiceProcess, offline: list[dict[str, Any]], tmp_path: Path
) -> None:
    n = 7
    r = httpx.post(f"{server.url}/predict/batch", json={"users": [u["body"] for u in offline[:n]]})
    assert r.status_code == 200
    scored = httpx.get(f"{server.url}/metrics").text
    total = next(
        float(line.split()[-1])
        for line in scored.splitlines()
        if line.startswith("purchase_intent_users_scored_total ")
    )
    assert total >= n
    target = server.url.removeprefix("http://")
    with running_prometheus(target, tmp_path) as prometheus:

        def scraped() -> list[dict[str, Any]]:
            answer = httpx.get(
                f"{prometheus}/api/v1/query", params={"query": "purchase_intent_users_scored_total"}
            ).json()
            assert answer["status"] == "success"
            found: list[dict[str, Any]] = answer["data"]["result"]
            return found

        result = waiting.wait_until(
            scraped,
            timeout=30,
            interval=0.25,
            message="Prometheus never scraped purchase_intent_users_scored_total",
        )
        assert float(result[0]["value"][1]) >= total
        assert result[0]["metric"]["job"] == "purchase-intent"
        up = httpx.get(f"{prometheus}/api/v1/query", params={"query": "up"}).json()["data"]["result"]
        assert [float(x["value"][1]) for x in up] == [1.0]
        info = httpx.get(f"{prometheus}/api/v1/query", params={"query": "purchase_intent_model_info"}).json()[
            "data"
        ]["result"]
        assert info
        assert info[0]["metric"]["provider"] == "CPUExecutionProvider"


def test_sigterm_shuts_down_gracefully(tiny_model_dir: TinyModel, tmp_path: Path) -> None:
    with running_service(tiny_model_dir.model, tmp_path / "service.log") as proc:
        pass
    # uvicorn finishes its shutdown, then re-raises SIGTERM so the exit status says what stopped it
    assert proc.process.returncode in (0, -signal.SIGTERM)
    messages = [x["message"] for x in proc.log_lines()]
    assert "Application shutdown complete." in messages


def _sample(metrics_text: str, name: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


def test_concurrent_predicts_are_batched_and_lone_ones_are_not(
    server: ServiceProcess, offline: list[dict[str, Any]]
) -> None:
    """Over real sockets: a lone request skips the batcher's queue; 32 connections at once share
    inference calls, and every answer is still its own user's (the direct /predict route)."""
    bodies = [u["body"] for u in offline[:64]]
    queued = "purchase_intent_batch_queue_duration_seconds_count"
    calls = "purchase_intent_batch_size_count"
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = client.get("/metrics").text
        alone = [client.post("/predict", json=b).json()["probability"] for b in bodies[:8]]
        after_alone = client.get("/metrics").text
    assert _sample(after_alone, queued) == _sample(before, queued)
    assert _sample(after_alone, calls) - _sample(before, calls) == 8

    async def burst() -> list[float]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            answers = await asyncio.gather(*(client.post("/predict", json=b) for b in bodies * 4))
        assert all(r.status_code == 200 for r in answers)
        return [r.json()["probability"] for r in answers]

    together = asyncio.run(burst())
    with httpx.Client(base_url=server.url, timeout=60) as client:
        after_burst = client.get("/metrics").text
    want = np.array([u["probability"] for u in offline[:64]] * 4)
    np.testing.assert_allclose(np.array(together), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(alone), want[:8], rtol=0, atol=1e-6)
    assert _sample(after_burst, queued) > _sample(after_alone, queued)  # some went through the queue
    assert _sample(after_burst, calls) - _sample(after_alone, calls) < len(together)  # fewer calls
