"""Graceful shutdown of a real ``python -m service`` process: SIGTERM under load loses nothing.

The sequence under test (``service/server.py``): readiness 503 at once, still serving during the
drain, then the socket closes, requests in flight get their answers, exit within the grace period.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, start_service, wait_until
from tests.service.wire import connect, head, read_response

pytestmark = pytest.mark.slow

USER = {
    "user_id": "u-1",
    "as_of": "1997-09-30T00:00:00Z",
    "events": [{"timestamp": "1997-09-01T00:00:00Z", "amount": 10.0, "quantity": 1}] * 5,
}
BATCH = {"users": [USER] * 200}  # over the inline size: scored in the worker threads


def _start(tmp_path: Path, **env: str) -> ServiceProcess:
    proc = start_service(write_model(tmp_path / "model.onnx"), tmp_path / "service.log", env=env)
    wait_until(f"{proc.url}/readyz", proc.process)
    return proc


def _exit_within(proc: ServiceProcess, seconds: float) -> int:
    try:
        return proc.process.wait(timeout=seconds)
    finally:
        proc.stop()


def test_sigterm_under_load_answers_every_accepted_request(tmp_path: Path) -> None:
    drain, grace = 2, 6
    proc = _start(tmp_path, PI_SHUTDOWN_DRAIN_SECONDS=str(drain), PI_SHUTDOWN_GRACE_SECONDS=str(grace))
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def load(worker: int) -> None:
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            while not stop.is_set():
                try:
                    if worker % 2:
                        r = client.post("/predict/batch", json=BATCH)
                    else:
                        r = client.post("/predict", json=USER)
                    outcome = str(r.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes[outcome] += 1

    workers = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    probes: list[int] = []
    sent_at = time.monotonic()
    proc.process.send_signal(signal.SIGTERM)
    # The orchestrator's view: poll readiness on fresh connections, stop routing on the first 503.
    deadline = sent_at + drain
    while time.monotonic() < deadline:
        probes.append(httpx.get(f"{proc.url}/readyz", timeout=5).status_code)
        if probes[-1] == 503:
            break
        time.sleep(0.02)
    saw_503_after = time.monotonic() - sent_at
    stop.set()  # no new requests; the ones in flight must still be answered
    for w in workers:
        w.join(timeout=30)
    code = _exit_within(proc, grace + 5)
    exited_after = time.monotonic() - sent_at

    assert probes[-1] == 503, probes  # readiness failed while the socket still accepted connections
    assert saw_503_after < drain
    total = sum(outcomes.values())
    assert total > 20, outcomes
    assert outcomes == Counter({"200": total}), outcomes  # every accepted request got its answer
    print(f"shutdown under load: {total} requests, {total - outcomes['200']} failed")
    assert code in (0, -signal.SIGTERM)
    assert exited_after < grace + 3  # the grace period plus process start-up slack on a busy box
    messages = [x["message"] for x in proc.log_lines()]
    assert any(m.startswith("shutting down: readiness is 503") for m in messages)


def test_a_request_in_flight_at_sigterm_gets_its_answer(tmp_path: Path) -> None:
    """No drain: the socket closes at once, but the request whose body is still arriving is answered."""
    proc = _start(tmp_path, PI_SHUTDOWN_DRAIN_SECONDS="0", PI_SHUTDOWN_GRACE_SECONDS="10")
    body = httpx.Request("POST", "/", json=USER).content
    with connect(proc.url) as sock:
        sock.sendall(head("/predict", {"Content-Type": "application/json", "Content-Length": str(len(body))}))
        sock.sendall(body[:10])
        time.sleep(0.2)
        proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until the listening socket is closed
            try:
                httpx.get(f"{proc.url}/healthz", timeout=1)
            except httpx.ConnectError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the listening socket never closed after SIGTERM")
        assert proc.process.poll() is None  # still running: it waits for our request
        sock.sendall(body[10:])
        status, _, answer = read_response(sock)
    assert status == 200
    assert answer["user_id"] == "u-1"
    assert _exit_within(proc, 10) in (0, -signal.SIGTERM)


def test_the_grace_period_bounds_the_shutdown(tmp_path: Path) -> None:
    """A request that never completes cannot hold the process past the grace period."""
    grace = 2
    proc = _start(
        tmp_path,
        PI_SHUTDOWN_DRAIN_SECONDS="1",
        PI_SHUTDOWN_GRACE_SECONDS=str(grace),
        PI_REQUEST_TIMEOUT_SECONDS="120",
    )
    with connect(proc.url) as sock:
        sock.sendall(head("/predict", {"Content-Type": "application/json", "Content-Length": "500"}))
        sock.sendall(b'{"user_id": ')
        time.sleep(0.2)
        sent_at = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        code = _exit_within(proc, grace + 10)
        took = time.monotonic() - sent_at
    assert code in (0, -signal.SIGTERM)
    assert took < grace + 3
    assert took >= 1  # the drain was honoured first
