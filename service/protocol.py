"""uvicorn's httptools protocol with the writes of one event-loop turn sent as one.

uvicorn writes a response in two ``transport.write`` calls, the status line and headers on
``http.response.start`` and then the body, and the event loop's transport sends each at once: two
``send`` syscalls per small response, each paying loopback TCP delivery. Profiled under
64 connections they were a fifth of the service's event-loop time (issue 6). Here a connection's
writes are gathered until the end of the current turn of the loop and go out as one ``send``:
same bytes, same order, one syscall, and no added wait (the flush is the next callback the loop
runs, not a timer).

Everything else is the wrapped transport's: flow control still sees the real write buffer (a write
is at most one turn late), and ``close`` sends what is gathered before closing, so a
``Connection: close`` response is never cut off.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """Forwards to ``transport``; ``write`` gathers until the loop's next turn."""

    __slots__ = ("_buffer", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._pending = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.append(bytes(data))
        if not self._pending:
            self._pending = True
            self._loop.call_soon(self.flush)

    def writelines(self, lines: list[bytes]) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        self._pending = False
        if not self._buffer:
            return
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        if not self._transport.is_closing():  # the peer left meanwhile: nobody to send to
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=CoalescingHttpToolsProtocol)``: HTTP/1.1 by httptools, one send per
    response."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        wrapped: Any = _CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(wrapped)
