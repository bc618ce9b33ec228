"""``python -m service --workers 2``: one socket, two worker processes, one service to the client.

Every test talks to the parent's port over fresh connections (the kernel hands each to either
worker) and checks with the access log's ``worker`` field that both workers answered.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.drift import ScoreReference, ks, psi
from service.rollout import in_canary
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service, start_service, wait_until
from tests.waiting import wait_until as wait_for

pytestmark = pytest.mark.slow

TOKEN = "workers-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKERS = {"PI_WORKERS": "2", "PI_ADMIN_TOKEN": TOKEN}
#: a score reference in the model files, so the drift gauges exist too
REFERENCE = ScoreReference(
    count=10, edges=(0.2, 0.5), proportions=(0.3, 0.4, 0.3), grid=(0.1, 0.9), cdf=(0.5, 1.0)
)


def _user(user_id: str = "u-1", days: int = 3) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "as_of": "1997-09-30T00:00:00Z",
        "events": [
            {"timestamp": f"1997-09-{d + 1:02d}T00:00:00Z", "amount": 10.0 + d, "quantity": 1}
            for d in range(days)
        ],
    }


def _fresh(url: str) -> httpx.Client:
    """A client that opens a new connection per request, so requests spread over the workers."""
    return httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


def _workers_in_log(server: ServiceProcess, path: str) -> Counter[int]:
    return Counter(
        int(line["worker"])
        for line in server.log_lines()
        if line.get("logger") == "service.access" and line.get("path") == path
    )


def _workers(parent: int) -> list[int]:
    """The worker processes' pids (the parent's spawned children, not its resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    """Model files whose versions sort in the order they are reloaded."""
    return [
        write_model(
            tmp_path / f"m{k}.onnx",
            metadata=make_metadata(version=f"m-{k:02d}", score_reference=REFERENCE),
            bias=-0.5 + 0.1 * k,
        )
        for k in range(8)
    ]


@pytest.fixture
def server(models: list[Path], tmp_path: Path) -> Iterator[ServiceProcess]:
    with running_service(models[0], tmp_path / "service.log", env=WORKERS) as server:
        yield server


def test_a_scrape_counts_every_worker_s_requests_whichever_worker_answers(
    models: list[Path], tmp_path: Path
) -> None:
    """Every metric family there is (a shadow on every call, drift, outcome recording): counters
    and histograms are the totals over both workers, exactly, whichever worker answers."""
    env = {
        **WORKERS,
        "PI_SHADOW_MODEL": str(models[1]),
        "PI_SHADOW_SAMPLE": "1",
        "PI_OUTCOMES_INTERVAL_SECONDS": "0.5",
        "PI_DRIFT_MIN_SCORES": "10",
    }
    with running_service(models[0], tmp_path / "service.log", env=env) as server:
        _scrape_under_load(server)


def _scrape_under_load(server: ServiceProcess) -> None:
    sent = Counter[str]()
    lock = threading.Lock()
    stop = threading.Event()
    scrapes: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

    probabilities: list[float] = []

    def load(seed: int) -> None:
        days = random.Random(seed)
        with _fresh(server.url) as c:
            while not stop.is_set():
                r = c.post("/predict", json=_user(days=days.randint(1, 6)))
                with lock:
                    sent[str(r.status_code)] += 1
                    probabilities.append(r.json()["probability"])

    threads = [threading.Thread(target=load, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        with _fresh(server.url) as c:
            for _ in range(20):  # scrapes while the load hits both workers: counters never go back
                scrapes.append(_samples(c.get("/metrics").text))
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    key = ("purchase_intent_requests_total", (("route", "/predict"), ("status_class", "2xx")))
    seen = [s.get(key, 0.0) for s in scrapes]
    assert seen == sorted(seen), seen
    assert set(sent) == {"200"}, sent
    assert sent["200"] > 50

    time.sleep(1.5)  # a drift round and an outcome round in each worker
    with _fresh(server.url) as c:
        quiet = [_samples(c.get("/metrics").text) for _ in range(10)]
    names = {name for name, _ in quiet[0]}
    for family in ("purchase_intent_score_window_size", "purchase_intent_shadow_mean_score_difference"):
        assert family in names, family
    deciles = ("purchase_intent_score_deciles_count", (("model_version", "m-00"),))
    assert quiet[0][deciles] == sent["200"]  # each worker's drift histogram, summed
    # PSI and KS over both workers' windows together: every score served (fewer than a window)
    scores = np.asarray(probabilities, dtype=np.float64)
    served = (("model_version", "m-00"),)
    assert quiet[0][("purchase_intent_score_psi", served)] == pytest.approx(psi(REFERENCE, scores), rel=1e-12)
    assert quiet[0][("purchase_intent_score_ks", served)] == pytest.approx(ks(REFERENCE, scores), rel=1e-12)
    shadow = ("purchase_intent_shadow_calls_total", (("result", "scored"),))
    calls = ("purchase_intent_batch_size_count", ())  # a shadow on every scoring call
    assert quiet[0][shadow] == quiet[0][calls]
    for s in quiet:  # exact, and the same from either worker
        assert s[key] == sent["200"]
        assert s[("purchase_intent_users_scored_total", ())] == sent["200"]
        duration = ("purchase_intent_request_duration_seconds_count", (("route", "/predict"),))
        assert s[duration] == sent["200"]
        counted = ("purchase_intent_predicted_probability_count", ())
        assert s[counted] == sent["200"]
        assert s[("purchase_intent_ready", ())] == 1.0
        assert s[("purchase_intent_requests_in_flight", ())] >= 1.0  # the scrape itself
    assert set(_workers_in_log(server, "/predict")) == {0, 1}


def test_no_client_sees_a_new_model_and_then_an_old_one(server: ServiceProcess, models: list[Path]) -> None:
    """Reloads of ever newer versions under load from several clients: a request sent after any
    answer from version k arrived is answered by version k or later, in whichever worker."""
    answers: list[tuple[float, float, int]] = []  # (sent, received, version number)
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:
        with _fresh(server.url) as c:
            while not stop.is_set():
                sent = time.monotonic()
                r = c.post("/predict", json=_user())
                received = time.monotonic()
                with lock:
                    if r.status_code != 200:
                        failures.append(r.text[:200])
                    else:
                        answers.append((sent, received, int(r.json()["model_version"][2:])))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with _fresh(server.url) as admin:
            for k in range(1, len(models)):
                r = admin.post("/admin/reload", json={"model_path": str(models[k])}, headers=AUTH)
                assert r.status_code == 200, r.text
                answered = time.monotonic()
                assert r.json() == r.json() | {
                    "model_version": f"m-{k:02d}",
                    "previous_version": f"m-{k - 1:02d}",
                }
                for _ in range(6):  # every worker reports it as soon as the reload has answered
                    assert admin.get("/v1/model").json()["model_version"] == f"m-{k:02d}"
                with lock:
                    answers.append((answered, answered, k))
                time.sleep(0.2)
            refused = admin.post("/admin/reload", json={"model_path": "/no/such.onnx"}, headers=AUTH)
            assert refused.status_code == 422
            assert refused.json()["error"] == "model_rejected"
            for _ in range(6):
                assert admin.get("/v1/model").json()["model_version"] == f"m-{len(models) - 1:02d}"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    # For each answer in the order requests were sent: the newest version received before it was
    # sent, by any client; the answer must not be older.
    received = sorted((a[1], a[2]) for a in answers)
    newest, i = 0, 0
    for sent, _, version in sorted(answers):
        while i < len(received) and received[i][0] < sent:
            newest = max(newest, received[i][1])
            i += 1
        assert version >= newest, f"version {version} answered after {newest} was seen"
    latest_received = max(a[2] for a in answers)
    assert latest_received == len(models) - 1
    assert set(_workers_in_log(server, "/predict")) == {0, 1}
    assert len(_workers_in_log(server, "/admin/reload")) >= 1


def test_a_canary_splits_users_by_the_same_rule_in_every_worker(
    server: ServiceProcess, models: list[Path]
) -> None:
    with _fresh(server.url) as c:
        r = c.put("/admin/models/canary", json={"model_path": str(models[3]), "percent": 40}, headers=AUTH)
        assert r.status_code == 200, r.text
        users = [f"user-{i}" for i in range(120)]
        for user in users:
            version = c.post("/predict", json=_user(user)).json()["model_version"]
            assert version == ("m-03" if in_canary(user, 40) else "m-00"), user
        promoted = c.post("/admin/models/canary/promote", headers=AUTH)
        assert promoted.status_code == 200
        for user in users[:20]:
            assert c.post("/predict", json=_user(user)).json()["model_version"] == "m-03"
        loaded = c.get("/metrics").text
    assert 'purchase_intent_loaded_model_info{model_version="m-03",role="primary"} 1.0' in loaded
    assert 'role="canary"' not in loaded
    assert set(_workers_in_log(server, "/predict")) == {0, 1}


def test_readiness_waits_for_every_worker_and_a_restarted_one_serves_what_the_others_do(
    server: ServiceProcess, models: list[Path]
) -> None:
    with _fresh(server.url) as c:
        assert c.post("/admin/reload", json={"model_path": str(models[5])}, headers=AUTH).status_code == 200
        workers = _workers(server.process.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)

        def not_ready() -> dict[str, Any] | None:
            r = c.get("/readyz")
            return None if r.status_code == 200 else dict(r.json())

        status = wait_for(not_ready, timeout=10, interval=0.02, message=lambda: "still ready, a worker gone")
        assert status["status"] == "workers_not_ready"
        wait_until(f"{server.url}/readyz", server.process, timeout=60)
        for _ in range(40):  # the restarted worker joined the reloaded model, not the configured one
            assert c.post("/predict", json=_user()).json()["model_version"] == "m-05"
    joined = [line for line in server.log_lines() if line["message"] == "joined the other workers' models"]
    assert joined


def test_events_written_through_one_worker_are_read_through_the_other(server: ServiceProcess) -> None:
    users = [f"shopper-{i}" for i in range(30)]
    with _fresh(server.url) as c:
        for user in users:
            body = _user(user, days=4)
            r = c.post("/events", json={"events": [{**e, "user_id": user} for e in body["events"]]})
            assert r.status_code in (200, 201, 202), r.text
        for user in users:
            stored = c.post("/predict", json={"user_id": user, "as_of": "1997-09-30T00:00:00Z"})
            direct = c.post("/predict", json=_user(user, days=4))
            assert stored.status_code == 200, stored.text
            assert stored.json()["probability"] == direct.json()["probability"]
    assert set(_workers_in_log(server, "/events")) == {0, 1}


def test_sigterm_drains_every_worker_and_loses_no_request(models: list[Path], tmp_path: Path) -> None:
    env = {**WORKERS, "PI_SHUTDOWN_DRAIN_SECONDS": "2"}
    with running_service(models[0], tmp_path / "service.log", env=env) as server:
        pids = _workers(server.process.pid)
        assert len(pids) == 2
        results: Counter[str] = Counter()
        lock = threading.Lock()
        stop = threading.Event()
        ready_codes: list[int] = []

        def load() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:  # keep-alive, as a balancer
                while not stop.is_set():
                    try:
                        code = str(c.post("/predict", json=_user()).status_code)
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                    with lock:
                        results[code] += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        with _fresh(server.url) as c:
            for _ in range(5):
                ready_codes.append(c.get("/readyz").status_code)
                time.sleep(0.1)
        time.sleep(0.8)  # still inside the drain: the load keeps being answered
        stop.set()
        for t in threads:
            t.join()
        assert server.process.wait(timeout=15) == 0
    assert ready_codes == [503] * 5
    assert set(results) == {"200"}, results
    assert not [pid for pid in pids if _running(pid)]
    drained = [
        int(line["worker"]) for line in server.log_lines() if line["message"].startswith("shutting down")
    ]
    assert sorted(drained) == [0, 1]


def test_one_worker_that_cannot_load_its_model_stops_the_service(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    server = start_service(broken, tmp_path / "service.log", env=WORKERS)
    try:
        assert server.process.wait(timeout=60) == 1
    finally:
        server.stop()
    messages = [line["message"] for line in server.log_lines()]
    assert "a worker process cannot load its model: stopping" in messages
    assert "a worker process died; starting another" not in messages


def test_an_erasure_drops_the_user_s_predictions_buffered_in_every_worker(
    models: list[Path], tmp_path: Path
) -> None:
    """Predictions wait in each worker's buffer for the next flush (here: only the one at
    shutdown). An erasure answered by one worker must empty the other's buffer too."""
    store = tmp_path / "events.sqlite3"
    env = {**WORKERS, "PI_STORE_PATH": str(store), "PI_OUTCOMES_FLUSH_SECONDS": "3600"}
    with running_service(models[0], tmp_path / "service.log", env=env) as server:
        with _fresh(server.url) as c:
            for _ in range(40):
                for user in ("erase-me", "keep-me"):
                    assert c.post("/predict", json=_user(user)).status_code == 200
            assert c.delete("/users/erase-me", headers=AUTH).status_code == 200
        server.process.send_signal(signal.SIGTERM)  # each worker flushes its buffer on the way out
        assert server.process.wait(timeout=30) == 0
    assert set(_workers_in_log(server, "/predict")) == {0, 1}
    with sqlite3.connect(store) as db:
        users = {row[0] for row in db.execute("SELECT DISTINCT user_id FROM predictions")}
    assert users == {"keep-me"}
