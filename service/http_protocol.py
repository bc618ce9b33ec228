"""uvicorn's httptools protocol with a deadline for the request head.

uvicorn bounds idle keep-alive connections and the service bounds the body, but nothing bounds the
request line and headers: a client that sends nothing, or trickles a header byte every few seconds
(slowloris), holds a connection for as long as it likes. Here the head must be complete
``head_timeout`` seconds after the connection opens or its previous response ends, or the client
gets a 408 in the JSON envelope and is closed. The deadline is a number on the connection, checked
by one sweep per event loop: a timer armed and cancelled per request costs throughput (bench/README.md).
"""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: The loops that have a sweep scheduled (one per loop, whatever the number of connections).
_SWEEPING: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


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


def _sweep(loop: asyncio.AbstractEventLoop, connections: set[Any], every: float) -> None:
    """Close the server's connections whose request head is overdue; run again in ``every`` s.
    Holds the server's connection set, never a connection."""
    now = loop.time()
    for connection in list(connections):
        if isinstance(connection, HeadTimeoutProtocol):
            deadline = connection._head_deadline
            if deadline is not None and now >= deadline:
                connection._head_expired()
    loop.call_later(every, _sweep, loop, connections, every)


class HeadTimeoutProtocol(HttpToolsProtocol):
    """Use :func:`with_head_timeout` to get one with its deadline set."""

    head_timeout: float = 10.0
    _head_deadline: float | None = None  # loop time by which the request head must be complete

    def _head_expired(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.write(_answer(self.head_timeout))
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = self.loop.time() + self.head_timeout
        if self.loop not in _SWEEPING:
            _SWEEPING.add(self.loop)
            every = min(1.0, self.head_timeout / 4)
            self.loop.call_later(every, _sweep, self.loop, self.connections, every)

    def on_headers_complete(self) -> None:
        self._head_deadline = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            # the next request's head, from now (time idle between requests counts)
            self._head_deadline = self.loop.time() + self.head_timeout


def with_head_timeout(seconds: float) -> type[HeadTimeoutProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with its deadline."""
    attributes: dict[str, Any] = {"head_timeout": seconds}
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), attributes)
