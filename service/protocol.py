"""uvicorn's httptools protocol with a deadline for the request head.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``, armed after a response and
disarmed by the next byte) and the body (our ``PI_REQUEST_TIMEOUT_SECONDS``), but nothing bounds
the request line and headers: a client that opens a connection and sends nothing, or trickles a
header byte every few seconds (slowloris), holds its connection and a file descriptor for as long
as it likes, and enough of them exhaust the process. Here a connection has ``head_timeout``
seconds from opening, or from the end of its previous response, until its request head is
complete; past that it gets a 408 in the service's JSON envelope and is closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _answer(timeout: float) -> bytes:
    body = json.dumps(
        {
            "error": "request_timeout",
            "message": f"the request line and headers did not arrive within {timeout:g} s",
            "detail": [],
        }
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class HeadTimeoutProtocol(HttpToolsProtocol):
    """Use :func:`with_head_timeout` to get one with its deadline set."""

    head_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_answer(self.head_timeout))
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm()  # the next request's head, starting now (idle time counts)


def with_head_timeout(seconds: float) -> type[HeadTimeoutProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with its deadline."""
    attributes: dict[str, Any] = {"head_timeout": seconds}
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), attributes)
