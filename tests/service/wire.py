"""Raw HTTP/1.1 over a socket, for what an HTTP client library will not do on purpose: announce a
body and not send it, stream one without end, send it one byte at a time."""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    assert host is not None
    assert port is not None
    return socket.create_connection((host, port), timeout=timeout)


def head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, lower-cased headers and the JSON body of one response (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data[:200]!r}")
        data += chunk
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(status_line.split()[1]), headers, json.loads(rest[:length] or b"null")
