"""One send per response: the writes of one event-loop turn leave as one, in order, and nothing is
lost when the connection closes; over a real socket, keep-alive and ``Connection: close`` answers
arrive whole."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.protocol import _CoalescingTransport
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service
from tests.service.wire import connect, head, read_response


class _Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 17


def test_writes_of_one_turn_go_out_as_one_in_order() -> None:
    async def scenario() -> list[bytes]:
        real = _Recorder()
        wrapped = _CoalescingTransport(real, asyncio.get_running_loop())
        wrapped.write(b"HTTP/1.1 200 OK\r\n\r\n")
        wrapped.write(b'{"a":')
        wrapped.write(memoryview(b"1}"))
        assert real.sent == []  # nothing sent before the turn ends
        await asyncio.sleep(0)
        wrapped.write(b"next")  # a later turn: its own send
        await asyncio.sleep(0)
        assert wrapped.get_write_buffer_size() == 17  # everything else is the real transport's
        return real.sent

    assert asyncio.run(scenario()) == [b'HTTP/1.1 200 OK\r\n\r\n{"a":1}', b"next"]


def test_close_sends_what_is_gathered_first_and_a_closed_peer_gets_nothing() -> None:
    async def scenario() -> tuple[_Recorder, _Recorder]:
        loop = asyncio.get_running_loop()
        closing, gone = _Recorder(), _Recorder()
        wrapped = _CoalescingTransport(closing, loop)
        wrapped.write(b"last answer")
        wrapped.close()
        other = _CoalescingTransport(gone, loop)
        other.write(b"too late")
        gone.closed = True  # the peer left before the turn ended
        await asyncio.sleep(0)
        return closing, gone

    closing, gone = asyncio.run(scenario())
    assert closing.sent == [b"last answer"]
    assert closing.closed
    assert gone.sent == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    tmp: Path = tmp_path_factory.mktemp("protocol")
    with running_service(write_model(tmp / "model.onnx"), tmp / "service.log") as proc:
        yield proc


def _body() -> bytes:
    return json.dumps({"user_id": "u", "events": [], "as_of": "1997-09-30T00:00:00Z"}).encode()


def test_keep_alive_and_connection_close_answers_arrive_whole(server: ServiceProcess) -> None:
    body = _body()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    with connect(server.url) as sock:
        for _ in range(3):  # three requests on one connection
            sock.sendall(head("/predict", headers) + body)
            status, _, answer = read_response(sock)
            assert status == 200
            assert answer["user_id"] == "u"
    with connect(server.url) as sock:
        sock.sendall(head("/predict", {**headers, "Connection": "close"}) + body)
        data = b""
        while chunk := sock.recv(65536):  # read to EOF: the server closes after the answer
            data += chunk
    raw_head, _, raw_body = data.partition(b"\r\n\r\n")
    assert raw_head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in raw_head.lower()
    assert json.loads(raw_body)["user_id"] == "u"
