"""Limits and hostile traffic against a real ``python -m service`` process over real sockets.

What only a socket can show: a 413 that arrives while the announced body has not been sent, a
chunked body cut off at the limit, a body that trickles in and times out, a 10 MB upload.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import waiting
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service
from tests.service.wire import connect, head, read_response

pytestmark = pytest.mark.slow

MAX_BODY = 1 << 20  # 1 MiB in this server, to keep the uploads quick
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("hostile")
    env = {
        "PI_MAX_BODY_BYTES": str(MAX_BODY),
        "PI_REQUEST_TIMEOUT_SECONDS": str(TIMEOUT),
        "PI_HEADER_TIMEOUT_SECONDS": str(TIMEOUT),
    }
    with running_service(write_model(tmp / "model.onnx"), tmp / "service.log", env=env) as proc:
        yield proc


def test_an_announced_large_body_is_refused_before_it_is_sent(server: ServiceProcess) -> None:
    with connect(server.url) as sock:
        sock.sendall(head("/predict", {"Content-Type": "application/json", "Content-Length": "10000000"}))
        status, headers, body = read_response(sock)  # not one byte of the body was sent
    assert status == 413
    assert body["error"] == "body_too_large"
    assert headers["content-type"] == "application/json"


def test_a_chunked_body_is_cut_off_at_the_limit(server: ServiceProcess) -> None:
    chunk = b"[" * 65536
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = 0
    with connect(server.url) as sock:
        sock.sendall(head("/predict", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}))
        sock.setblocking(False)
        while sent < 8 * MAX_BODY:  # the body never ends: the server must answer on its own
            readable, writable, _ = select.select([sock], [sock], [], 5.0)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(framed)
                except BlockingIOError:
                    continue
        sock.setblocking(True)
        status, _, body = read_response(sock)
    assert status == 413
    assert body["error"] == "body_too_large"
    assert sent < 8 * MAX_BODY


def test_a_body_that_trickles_in_is_a_408(server: ServiceProcess) -> None:
    started = time.monotonic()
    with connect(server.url) as sock:
        sock.sendall(head("/predict", {"Content-Type": "application/json", "Content-Length": "200"}))
        sock.sendall(b'{"user_id": "slow", ')  # and nothing more
        status, _, body = read_response(sock)
    assert status == 408
    assert body["error"] == "request_timeout"
    assert time.monotonic() - started < TIMEOUT + 10  # generous: a loaded CI machine


def test_a_10_mb_upload_is_a_413_and_the_server_carries_on(server: ServiceProcess) -> None:
    body = b'{"user_id": "u", "events": [' + b'{"timestamp": "1997-01-01T00:00:00Z"}, ' * 260_000
    assert len(body) > 10_000_000
    with httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"] == "body_too_large"
        ok = client.post("/predict", json={"user_id": "u", "events": []})  # same connection
        assert ok.status_code == 200


def test_invalid_utf8_and_deep_nesting_over_the_wire(server: ServiceProcess) -> None:
    cases = {
        b'{"user_id": "\xff\xfe\xfd", "events": []}': 400,
        b"[" * 100_000: 400,
        b'{"user_id": "u", "events": []}\x00': 400,
    }
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for content, status in cases.items():
            r = client.post("/predict", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (content[:40], r.text)
            assert r.json()["error"] == "invalid_json"


def test_error_bodies_carry_no_traceback_or_path(server: ServiceProcess, tmp_path: Path) -> None:
    log_dir = str(server.log.parent)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answers = [
            client.post("/predict", content=b"{", headers={"Content-Type": "application/json"}),
            client.post("/predict", json={"user_id": 1}),
            client.post("/predict/batch", json={"users": []}),
            client.get("/nope/../../etc/passwd"),
            client.post("/admin/reload", json={"model_path": "/etc/passwd"}),  # disabled here: 404
            client.put("/predict"),
        ]
    for r in answers:
        assert 400 <= r.status_code < 500, r.text
        assert "Traceback" not in r.text
        assert 'File "' not in r.text
        assert log_dir not in r.text
        assert "/service/" not in r.text


def _access_line(server: ServiceProcess, request_id: str) -> dict[str, object]:
    return waiting.wait_until(
        lambda: next((e for e in server.log_lines() if e.get("request_id") == request_id), None),
        timeout=10,
        interval=0.05,
        message=f"no access line for {request_id}",
    )


def test_a_client_that_leaves_mid_body_is_logged_as_499_and_the_server_carries_on(
    server: ServiceProcess,
) -> None:
    with connect(server.url) as sock:
        headers = {"Content-Type": "application/json", "Content-Length": "200", "X-Request-ID": "gone-1"}
        sock.sendall(head("/predict", headers))
        sock.sendall(b'{"user_id": "leaving", ')  # then the connection closes
    line = _access_line(server, "gone-1")
    assert line["status"] == 499
    assert line["route"] == "/predict"
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200


def test_a_client_that_leaves_mid_batch_body_is_a_499_too(server: ServiceProcess) -> None:
    with connect(server.url) as sock:
        headers = {"Content-Type": "application/json", "Content-Length": "200", "X-Request-ID": "gone-2"}
        sock.sendall(head("/predict/batch", headers))
        sock.sendall(b'{"users": [')
    assert _access_line(server, "gone-2")["status"] == 499
    assert not [e for e in server.log_lines() if e.get("level") == "error"]  # not an unhandled error


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_headers_that_trickle_in_get_a_408_and_the_connection_closes(server: ServiceProcess) -> None:
    started = time.monotonic()
    with connect(server.url) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\n")
        try:
            for byte in b"Content-Type: application/json\r\n":
                sock.sendall(bytes([byte]))
                time.sleep(0.2)  # one byte every 0.2 s: the slowloris client is what is under test
        except OSError:
            pass  # the server closed on us mid-trickle: what the test wants
        answer = _read_to_eof(sock)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
    assert TIMEOUT <= elapsed < TIMEOUT + 5  # not before the deadline, and not much after it


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server: ServiceProcess) -> None:
    started = time.monotonic()
    with connect(server.url) as sock:
        answer = _read_to_eof(sock)
    assert answer.startswith(b"HTTP/1.1 408")
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 5


def test_keep_alive_requests_with_pauses_under_the_header_timeout_are_served(server: ServiceProcess) -> None:
    body = json.dumps({"user_id": "u", "events": [], "as_of": "1997-09-30T00:00:00Z"}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    with connect(server.url) as sock:
        for _ in range(3):
            time.sleep(0.6 * TIMEOUT)  # the pauses are the test: each under the timeout, all three over it
            sock.sendall(head("/predict", headers) + body)
            status, _, answer = read_response(sock)
            assert status == 200
            assert answer["user_id"] == "u"
