"""Overload against a real process on loopback: far more concurrent clients than the service admits.

The service must shed the excess with 503 + ``Retry-After`` (never queue it without bound), keep
``/healthz`` answering, keep its memory bounded, and serve every request again once the load drops.
Bounded: a few seconds of load, loopback only. Bounds on time and memory are deliberately loose
(another job shares the cores); what is asserted strictly is the status of every answer.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.service.onnx_models import write_model
from tests.service.processes import running_service

pytestmark = pytest.mark.slow

USER = {
    "user_id": "u-1",
    "as_of": "1997-09-30T00:00:00Z",
    "events": [{"timestamp": "1997-09-01T00:00:00Z", "amount": 10.0, "quantity": 2}] * 20,
}
BATCH = {"users": [USER] * 100}  # ~0.2 MB: parsed and scored in the worker thread
CLIENTS = 32
LIMIT = 4


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_overload_is_shed_probes_stay_up_and_it_recovers(tmp_path: Path) -> None:
    env = {"PI_MAX_CONCURRENT_REQUESTS": str(LIMIT), "PI_BATCH_THREADS": "1"}
    with running_service(write_model(tmp_path / "model.onnx"), tmp_path / "service.log", env=env) as server:
        pid = server.process.pid
        with httpx.Client(base_url=server.url, timeout=30) as warm:
            for _ in range(20):
                assert warm.post("/predict/batch", json=BATCH).status_code == 200
        rss_before = _rss_bytes(pid)

        stop = threading.Event()
        outcomes: Counter[str] = Counter()
        shed_headers: list[tuple[str | None, str]] = []
        probe_seconds: list[float] = []
        lock = threading.Lock()

        def flood() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/predict/batch", json=BATCH)
                        key = str(r.status_code)
                    except httpx.HTTPError as exc:
                        r, key = None, type(exc).__name__
                    with lock:
                        outcomes[key] += 1
                        if r is not None and r.status_code == 503:
                            shed_headers.append((r.headers.get("retry-after"), r.json()["error"]))

        def probe() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                while not stop.is_set():
                    started = time.monotonic()
                    assert c.get("/healthz").status_code == 200
                    probe_seconds.append(time.monotonic() - started)
                    time.sleep(0.05)  # the pace of the probing, like an orchestrator's (only faster)

        threads = [threading.Thread(target=flood) for _ in range(CLIENTS)]
        threads.append(threading.Thread(target=probe))
        for t in threads:
            t.start()
        time.sleep(4)  # how long the flood lasts: a sustained overload is what is under test
        rss_during = _rss_bytes(pid)
        stop.set()
        for t in threads:
            t.join(timeout=60)

        with httpx.Client(base_url=server.url, timeout=30) as after:
            recovered = [after.post("/predict/batch", json=BATCH).status_code for _ in range(30)]
            metrics = after.get("/metrics").text

    assert set(outcomes) <= {"200", "503"}, outcomes  # no 5xx but the shed 503, no dropped connection
    assert outcomes["503"] > 0, outcomes  # the excess really was shed
    assert outcomes["200"] > 0, outcomes  # and the admitted requests were served meanwhile
    assert set(shed_headers) == {("1", "overloaded")}
    assert probe_seconds, "the probe never ran"
    assert max(probe_seconds) < 2.0, max(probe_seconds)  # loose: the point is "answers", not a p99
    assert rss_during - rss_before < 200 * 2**20, (rss_before, rss_during)
    assert recovered == [200] * 30
    assert "purchase_intent_requests_in_flight 1.0" in metrics  # only the scrape itself
    worst = max(probe_seconds) * 1000
    print(f"overload: {dict(outcomes)}, healthz max {worst:.0f} ms over {len(probe_seconds)} probes")
