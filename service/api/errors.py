"""The exception handlers that route every framework and service error through the one envelope
(``service/envelope.py``; the typed errors themselves are ``service/errors.py``, free of HTTP)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

from service.envelope import error_response, rejection
from service.errors import ErrorDetail, ServiceError, field_path
from service.metrics import Metrics

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Route every error the framework or our code raises through the one envelope.

    Unexpected exceptions are not handled here: the request middleware turns them into a bare 500
    (it sits outside the routing layer, so it also catches errors raised in other middleware).
    """

    async def _service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return rejection(exc, metrics)

    async def _http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        metrics.rejected.labels(code).inc()
        message = {
            "not_found": "no such endpoint",
            "method_not_allowed": "method not allowed on this endpoint",
        }.get(code, "the request cannot be processed")
        headers: dict[str, Any] | None = getattr(exc, "headers", None)
        if exc.status_code == 405 and (allowed := _allowed(request)):
            headers = {**(headers or {}), "Allow": allowed}
        return error_response(exc.status_code, code, message, headers=headers)

    async def _request_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        items = [
            ErrorDetail(
                field=field_path(e.get("loc", ())), type=str(e.get("type")), message=str(e.get("msg"))
            )
            for e in exc.errors()
        ]
        metrics.rejected.labels("invalid_input").inc()
        return error_response(422, "invalid_input", "the request does not match the schema", items)

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation)


def _allowed(request: Request) -> str | None:
    """Every method served at the path template Starlette's router chose. Its 405 names only the
    first route that matched the path, which is wrong where two routes share a template (``PUT``
    and ``DELETE /admin/models/shadow``). ``None`` leaves the handler's own header (a route that
    took the request and refused it, as ``DELETE /users/{id}`` does for ``/users/u-1/events``)."""
    routes = list(_routes(request.app.router.routes))
    template = None
    for route in routes:
        match, _ = route.matches(request.scope)
        if match is Match.FULL:
            return None
        if match is Match.PARTIAL:
            template = getattr(route, "path", None)
            break
    if template is None:
        return None
    methods: set[str] = set()
    for route in routes:
        if getattr(route, "path", None) == template:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods)) or None


def _routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    # FastAPI wraps each included router; its routes are the ones that match paths
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _routes(inner.routes)
        else:
            yield route
