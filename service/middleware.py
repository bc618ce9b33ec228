"""The one request middleware: request id, in-flight gauge, request metrics, access log, last-resort 500.

A plain ASGI middleware rather than ``BaseHTTPMiddleware``: it wraps ``send`` instead of running
the app in a task group and streaming the response through it, a per-request cost larger than all
of this middleware's own work.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time

from prometheus_client import Counter, Histogram
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Access
from service.envelope import error_response
from service.metrics import UNMATCHED_ROUTE, Metrics

logger = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
#: Probes and scrapes arrive every few seconds forever; logging them buries the real traffic.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: A client's request id is echoed only if it is short and plain; anything else is replaced.
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_MAX_LOGGED_PATH = 200
#: What the access log and metrics record for a request whose client left before the answer (nginx's 499).
CLIENT_CLOSED = 499


#: Request ids need to be unique, not secret: 128 bits from a PRNG seeded once from the OS, not a
#: getrandom syscall per request as uuid4() makes.
_IDS = random.Random(os.urandom(32))  # nosec B311


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _SAFE_ID.fullmatch(value):
            return str(value.decode("ascii"))
    return f"{_IDS.getrandbits(128):032x}"


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class RequestMiddleware:
    """Outermost user middleware, so it also times and catches what other middleware does."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, access: Access | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.access = access
        # Label children by (route, status class): ``labels()`` looks them up under a lock on
        # every call; the key sets are closed (route templates, five classes).
        self._counted: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def _children(self, route: str, status: int) -> tuple[Counter, Histogram]:
        key = (route, status // 100)
        children = self._counted.get(key)
        if children is None:
            m = self.metrics
            children = (m.requests.labels(route, f"{status // 100}xx"), m.request_duration.labels(route))
            self._counted[key] = children
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        id_header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        m = self.metrics
        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
            if not response_started:
                status = CLIENT_CLOSED  # the client went away before there was an answer to send
        except ClientDisconnect:  # the same, noticed by a route that read the body with Starlette
            status = CLIENT_CLOSED
        except Exception:
            logger.exception("unhandled error", extra={"request_id": request_id})
            m.rejected.labels("internal_error").inc()
            if response_started:
                raise  # too late for a clean 500: let the server drop the connection
            status = 500
            # No exception text in the body: it can carry paths, values, library internals.
            response = error_response(500, "internal_error", "internal server error")
            await response(scope, receive, send_with_id)
        finally:
            m.in_flight.dec()
            duration = time.perf_counter() - started
            route = _route_label(scope)
            requests, durations = self._children(route, status)
            requests.inc()
            durations.observe(duration)
            path: str = scope["path"]
            state = scope.get("state") or {}
            audit = state.get("audit")
            if audit is not None and self.access is not None:  # set by the route's scope check
                user_id = (scope.get("path_params") or {}).get("user_id")
                self.access.audit(audit[1], audit[0], scope["method"], route, user_id, status)
            if path not in QUIET_PATHS and logger.isEnabledFor(logging.INFO):
                _access_line(
                    {
                        "method": scope["method"],
                        "path": path[:_MAX_LOGGED_PATH],
                        "route": route,
                        "status": status,
                        "duration_seconds": round(duration, 6),
                        "model_version": state.get("model_version"),
                        "request_id": request_id,
                    }
                )


def _access_line(fields: dict[str, object]) -> None:
    """``logger.info("request", extra=fields)`` without ``findCaller``: the JSON line has no source
    location, and walking the deep ASGI stack for one costs more than formatting the line."""
    logger.handle(
        logger.makeRecord(logger.name, logging.INFO, __file__, 0, "request", (), None, extra=fields)
    )
