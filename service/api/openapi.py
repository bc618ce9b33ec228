"""What the OpenAPI document says that FastAPI cannot infer from the routes.

Bodies are parsed by hand (``service/api/body.py``), so each route declares its request body
(:func:`json_body`) and the app publishes the request models' schemas
(:func:`publish_request_schemas`). Every error answer is the one envelope; :func:`errors_doc`
documents them from one table. :func:`add_direct_route` declares an operation that a plain ASGI
app answers (``POST /predict``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.bulk import ARROW_MEDIA_TYPE
from service.schemas import (
    EXAMPLE_COLUMNS,
    EXAMPLE_USER,
    BatchPredictRequest,
    ColumnarPredictRequest,
    ErrorResponse,
    PredictRequest,
)
from service.scopes import PUBLIC
from service.timestamps import EARLIEST, LATEST

#: What an error status means wherever a route does not say more.
_ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The body is not valid JSON.",
    401: "Missing or wrong bearer token.",
    408: "The body did not arrive within the request timeout.",
    413: "The body is larger than `PI_MAX_BODY_BYTES`.",
    415: "Content-Type is not application/json.",
}

Responses = dict[int | str, dict[str, Any]]


def errors_doc(*statuses: int | tuple[int, str]) -> Responses:
    """OpenAPI ``responses`` for error statuses, each answered with the envelope, in the order given:
    a bare status takes the shared description, ``(status, description)`` says what it means here."""
    out: Responses = {}
    for entry in statuses:
        status, description = entry if isinstance(entry, tuple) else (entry, _ERROR_DESCRIPTIONS[entry])
        out[status] = {"model": ErrorResponse, "description": description}
    return out


#: The errors of ``/predict`` and ``/predict/batch``.
PREDICT_ERRORS = (
    (400, "The body is not valid JSON (or not a readable Arrow stream)."),
    408,
    413,
    415,
    (
        422,
        "Wrong or missing fields, non-finite or negative numbers, timestamps that do not parse, lack "
        f"a UTC offset or lie outside {EARLIEST.year}..{LATEST.year}, too many events for a user; "
        "`history_compacted`: `as_of` before the stored history's retention horizon.",
    ),
    (
        404,
        "A user sent without `events` has no stored history (`unknown_user`; with "
        "`PI_STORE_UNKNOWN_USER=empty` they are scored as a new user instead).",
    ),
    (
        503,
        "No model is ready yet (`not_ready`), the service is at its concurrency limit "
        "(`overloaded`), or the event store is down (`store_unavailable`); retry after `Retry-After`.",
    ),
)


def json_body(model: type[BaseModel], examples: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for ``model`` (its schema is added by :func:`publish_request_schemas`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
                    "examples": examples,
                }
            },
        }
    }


def batch_body() -> dict[str, Any]:
    """``/predict/batch``: rows or columns as JSON, or an Arrow IPC stream."""
    extra = json_body(
        BatchPredictRequest,
        {
            "two_users": {
                "summary": "Two users, one inference call",
                "value": {
                    "users": [EXAMPLE_USER, {"user_id": "u-7", "events": [], "as_of": "1997-09-30T00:00:00Z"}]
                },
            },
            "columns": {
                "summary": "The same in columns (epoch seconds and RFC 3339 both accepted)",
                "value": EXAMPLE_COLUMNS,
            },
        },
    )
    content = extra["requestBody"]["content"]
    content["application/json"]["schema"] = {
        "oneOf": [
            {"$ref": f"#/components/schemas/{BatchPredictRequest.__name__}"},
            {"$ref": f"#/components/schemas/{ColumnarPredictRequest.__name__}"},
        ]
    }
    content[ARROW_MEDIA_TYPE] = {
        "schema": {
            "type": "string",
            "format": "binary",
            "description": "An Arrow IPC stream, one row per user: `user_id` (string), optional `as_of` "
            "(timestamp with a time zone, or epoch seconds; null = now), `events` (list of struct "
            "`timestamp`, `amount`, `quantity`). The answer is an Arrow stream too.",
        }
    }
    return extra


def publish_request_schemas(
    app: FastAPI,
    models: Sequence[type[BaseModel]],
    *,
    bearer: bool,
    list_limits: Sequence[tuple[type[BaseModel], str, int]],
    scopes: Callable[[], dict[tuple[str, str], str]] | None = None,
    rate_limited: frozenset[str] = frozenset(),
) -> None:
    """Add the hand-parsed request bodies' schemas to the document (and the bearer scheme), with
    what this deployment enforces that the models cannot say: ``list_limits`` as ``maxItems``
    (model, list field, limit), ``events`` required where no event store is mounted, and links
    between the store's operations where they are mounted."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            if bearer:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for request_model in models:
                body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in body.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[request_model.__name__] = body
            if "/events" not in schema["paths"]:
                _require_events(components)
            _limit_lists(components, list_limits)
            if "/users/{user_id}" in schema["paths"]:
                _link_user_operations(schema["paths"])
            if scopes is not None:
                _declare_scopes(schema["paths"], scopes(), rate_limited)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_scopes(
    paths: dict[str, Any], scopes: dict[tuple[str, str], str], rate_limited: frozenset[str]
) -> None:
    """With tokens on: every operation that needs a token says so (``security``, its scope as
    ``x-scope``, the 401 and 403 it can answer, and the 429 where its scope is rate limited)."""
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for (method, path), scope in scopes.items():
        operation = paths.get(_PATH_PARAM.sub(r"{\1}", path), {}).get(method.lower())
        if operation is None or scope == PUBLIC:
            continue
        operation["security"] = [{"bearer": []}]
        operation["x-scope"] = scope
        responses = operation.setdefault("responses", {})
        responses.setdefault("401", {"description": _ERROR_DESCRIPTIONS[401], "content": envelope})
        responses.setdefault(
            "403", {"description": f"The token lacks the `{scope}` scope (`forbidden`).", "content": envelope}
        )
        if scope in rate_limited:
            responses.setdefault(
                "429",
                {
                    "description": "Over this client's rate for the scope (`rate_limited`); "
                    "retry after `Retry-After`.",
                    "content": envelope,
                },
            )


def route_scopes(routes: Sequence[BaseRoute]) -> dict[tuple[str, str], str]:
    """(method, path template) -> the scope its route declares (``service.api.deps.Scoped``),
    looking into included routers (FastAPI keeps them as entries of their own)."""
    out: dict[tuple[str, str], str] = {}
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            out |= route_scopes(original.routes)
        elif isinstance(route, APIRoute):
            for dependency in route.dependant.dependencies:
                scope = getattr(dependency.call, "scope", None)
                if isinstance(scope, str):
                    out |= {(method, route.path): scope for method in route.methods or ()}
    return out


_PATH_PARAM = re.compile(r"\{(\w+):\w+\}")  # "{user_id:text}" in a route, "{user_id}" in the document


def _limit_lists(components: dict[str, Any], limits: Sequence[tuple[type[BaseModel], str, int]]) -> None:
    for model, field, limit in limits:
        declared = components[model.__name__]["properties"][field]
        for branch in declared.get("anyOf", [declared]):  # `events` may also be null
            if branch.get("type") == "array":
                branch["maxItems"] = limit


def _require_events(components: dict[str, Any]) -> None:
    """Without an event store a user can only be scored from inline events: ``events`` is required
    (and not null), as the 422 for a user sent without them says."""
    request = components[PredictRequest.__name__]
    declared = request["properties"]["events"]
    (array,) = (branch for branch in declared.pop("anyOf") if branch.get("type") == "array")
    del declared["default"]
    declared.update(array)
    declared["description"] += " Required here: this server has no event store."
    request["required"] = [*request.get("required", []), "events"]


def _link_user_operations(paths: dict[str, Any]) -> None:
    """OpenAPI links between the event store's operations: what `POST /events` stored is read and
    erased by the user id it was sent with, and a read after an erasure is a 404."""
    read, erase = paths["/users/{user_id}/events"]["get"], paths["/users/{user_id}"]["delete"]

    def link(target: dict[str, Any], user_id: str, description: str) -> dict[str, Any]:
        return {
            "operationId": target["operationId"],
            "parameters": {"user_id": user_id},
            "description": description,
        }

    stored = "$request.body#/events/0/user_id"
    paths["/events"]["post"]["responses"]["200"]["links"] = {
        "readStoredEvents": link(read, stored, "The first event's user, with what the store holds of them."),
        "eraseUser": link(erase, stored, "Forget the first event's user."),
    }
    read["responses"]["200"]["links"] = {
        "eraseUser": link(erase, "$response.body#/user_id", "Forget this user."),
    }
    erase["responses"]["200"]["links"] = {
        "readStoredEvents": link(read, "$response.body#/user_id", "Gone: 404 `unknown_user`."),
    }


async def _documented_only() -> None:
    """The endpoint FastAPI reads a direct route's (absent) parameters from; never called."""


def _answered_by(app: ASGIApp) -> type[APIRoute]:
    class DirectRoute(APIRoute):
        async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
            if self.methods and scope["method"] not in self.methods:
                await super().handle(scope, receive, send)  # FastAPI's 405
                return
            await app(scope, receive, send)

    return DirectRoute


def add_direct_route(router: APIRouter, path: str, app: ASGIApp, *, name: str, **declaration: Any) -> None:
    """Declare ``path`` on ``router`` for the OpenAPI document, answered by ``app``, a plain ASGI app:
    FastAPI documents it from ``declaration`` and runs none of its request layers for it."""
    router.add_api_route(
        path, _documented_only, name=name, route_class_override=_answered_by(app), **declaration
    )
