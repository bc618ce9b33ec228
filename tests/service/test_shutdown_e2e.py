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
from prometheus_client.parser import text_string_to_metric_families

from tests import waiting
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


def _listening(proc: ServiceProcess) -> bool:
    try:
        httpx.get(f"{proc.url}/healthz", timeout=1)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        # refused, or accepted in the backlog just before the socket closed and then reset
        return False
    return True


def _requests_in_flight(proc: ServiceProcess) -> float:
    """The requests the server is handling now, not counting the scrape that asks."""
    text = httpx.get(f"{proc.url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "purchase_intent_requests_in_flight":
            return family.samples[0].value - 1
    raise AssertionError("purchase_intent_requests_in_flight is not exported")


def _wait_in_flight(proc: ServiceProcess) -> None:
    waiting.wait_until(
        lambda: _requests_in_flight(proc) >= 1,
        timeout=10,
        message="the server never started on the request whose body is still arriving",
    )


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

    def tally() -> Counter[str]:
        with lock:
            return Counter(outcomes)

    probes: list[int] = []

    def not_ready() -> bool:
        probes.append(httpx.get(f"{proc.url}/readyz", timeout=5).status_code)
        return probes[-1] == 503

    workers = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    try:
        waiting.wait_until(
            lambda: tally().total() > 20, timeout=30, message=lambda: f"the load never got going: {tally()}"
        )
        sent_at = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        # The orchestrator's view: poll readiness on fresh connections, stop routing on the first 503.
        # It fails while the socket still accepts connections: within the drain.
        waiting.wait_until(
            not_ready, timeout=drain, message=lambda: f"readiness never failed during the drain: {probes}"
        )
        saw_503_after = time.monotonic() - sent_at
    finally:
        stop.set()  # no new requests; the ones in flight must still be answered
        for w in workers:
            w.join(timeout=30)
    code = _exit_within(proc, grace + 5)
    exited_after = time.monotonic() - sent_at

    assert saw_503_after < drain
    total = sum(outcomes.values())
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
    try:
        with connect(proc.url) as sock:
            sock.sendall(
                head("/predict", {"Content-Type": "application/json", "Content-Length": str(len(body))})
            )
            sock.sendall(body[:10])
            _wait_in_flight(proc)
            proc.process.send_signal(signal.SIGTERM)
            waiting.wait_until(
                lambda: not _listening(proc),
                timeout=10,
                interval=0.05,
                message="the listening socket never closed after SIGTERM",
            )
            assert proc.process.poll() is None  # still running: it waits for our request
            sock.sendall(body[10:])
            status, _, answer = read_response(sock)
    except BaseException:
        proc.stop()  # a failure here must not leave the server running into the next test
        raise
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
        _wait_in_flight(proc)
        sent_at = time.monotonic()
        proc.process.send_signal(signal.SIGTERM)
        code = _exit_within(proc, grace + 10)
        took = time.monotonic() - sent_at
    assert code in (0, -signal.SIGTERM)
    assert took < grace + 3
    assert took >= 1  # the drain was honoured first
