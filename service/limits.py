"""Limits enforced before a request reaches a router: body size, and how many predictions at once.

A plain ASGI middleware, because both decisions come before the body is read: a ``Content-Length``
over the limit is refused from the headers, a chunked body is counted as the router reads it and
refused as soon as it passes. Predictions beyond ``max_concurrent_requests`` are shed at once
with 503 ``overloaded``: an unbounded queue turns a spike into unbounded memory and latency for
everyone. The count runs from a request's first byte to its last, so slow senders count too;
probes, ``/metrics`` and the admin endpoint are never shed.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.envelope import rejection
from service.errors import BodyTooLargeError, OverloadedError, ServiceError
from service.metrics import Metrics

#: The routes that do prediction work and so count against ``max_concurrent_requests``.
ADMITTED_PATHS = frozenset({"/predict", "/predict/batch", "/events"})


def is_admitted(path: str) -> bool:
    """A prediction route: one of :data:`ADMITTED_PATHS` or a V2 ``.../infer``."""
    return path in ADMITTED_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed Content-Length before us
    return None


class Admission:
    """How many prediction requests are in progress, shared by every stack that admits them (the
    app's middleware and the direct ``/predict`` route, see ``service.app``): one limit, one count."""

    def __init__(self, max_concurrent: int) -> None:
        self.max_concurrent = max_concurrent
        self.active = 0  # only the event loop thread touches it


class LimitMiddleware:
    """Body size for every request; admission (bounded concurrency) for prediction routes."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, admission: Admission) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.admission = admission

    def _too_large(self) -> BodyTooLargeError:
        return BodyTooLargeError(f"the request body is larger than {self.max_body_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(self._too_large(), scope, receive, send)
            return
        admission = self.admission
        admitted = is_admitted(scope["path"])
        if admitted:
            if admission.active >= admission.max_concurrent:
                error = OverloadedError.retry_later("the service is at its concurrency limit")
                await self._refuse(error, scope, receive, send)
                return
            admission.active += 1
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()  # raised inside the router's body read: the 413 handler answers
            return message

        try:
            await self.app(scope, counted_receive, send)
        finally:
            if admitted:
                admission.active -= 1

    async def _refuse(self, error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        # the body is left unread: uvicorn discards the rest after the answer, so the connection
        # stays usable for the client
        await rejection(error, self.metrics)(scope, receive, send)
