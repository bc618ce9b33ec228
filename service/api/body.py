"""Request bodies read by hand, and where the handler of one runs.

A body is read as bytes within the request timeout and parsed and validated in one pass by
pydantic's JSON parser: that is what tells invalid JSON (400) from wrong fields (422), and why the
OpenAPI bodies are declared by hand (``service/api/openapi.py``). A body up to
``inline_max_body_bytes`` is handled on the event loop, where a thread hop would cost more than the
work; a larger one, or one whose users must be read from the store, goes to the bounded thread pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope

from service.api.columns import StoreReadNeeded
from service.api.deps import AppContext, require_model
from service.errors import (
    OverloadedError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
    from_validation_error,
)
from service.lifecycle import LoadedModel

ModelT = TypeVar("ModelT", bound=BaseModel)
AnswerT = TypeVar("AnswerT")

#: ``(context, model, body, now, may_block) -> answer``: ``may_block`` is true in a worker thread,
#: where the handler may read the store; on the event loop it raises :class:`StoreReadNeeded`.
BodyHandler = Callable[[AppContext, LoadedModel, bytes, int, bool], bytes]


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


def media_type_of(scope: Scope) -> str:
    return _header(scope, b"content-type").decode("latin-1").split(";", 1)[0].strip().lower()


def check_json(media_type: str) -> None:
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise UnsupportedMediaTypeError("send the body as JSON with Content-Type: application/json")


def check_content_type(request: Request) -> None:
    check_json(media_type_of(request.scope))


def parse_json(model: type[ModelT], body: bytes) -> ModelT:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def _read_all(receive: Receive) -> bytes:
    """The whole body; :class:`ClientDisconnect` if the client leaves first (nobody to answer)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body(receive: Receive, ctx: AppContext) -> tuple[bytes, float]:
    """The body, read within the request timeout, and that deadline (event loop time)."""
    timeout = ctx.settings.request_timeout_seconds
    # the event loop's clock: anyio.current_time() reads the same clock but first looks up the
    # running async library, on every request
    deadline = asyncio.get_running_loop().time() + timeout
    # asyncio's timeout, not anyio.move_on_after: anyio's cancel scope is dearer, and grows with
    # the requests in flight; uvicorn always runs us on asyncio
    try:
        async with asyncio.timeout_at(deadline):
            body = await _read_all(receive)
    except TimeoutError:
        raise RequestTimeoutError(f"the request body did not arrive within {timeout:g} s") from None
    return body, deadline


async def receive_body(
    scope: Scope, receive: Receive, ctx: AppContext, check: Callable[[str], None] = check_json
) -> tuple[LoadedModel, bytes, float]:
    """Content type, model, body: the model this request runs on and its body, read in time."""
    check(media_type_of(scope))
    # The model this request runs on, taken once: a hot swap while it runs does not change it.
    served = require_model(ctx)
    # the version goes into the access log line, whatever happens next
    scope.setdefault("state", {})["model_version"] = served.predictor.metadata.model_version
    body, deadline = await read_body(receive, ctx)
    return served, body, deadline


async def offload(
    ctx: AppContext,
    handler: Callable[[AppContext, LoadedModel, bytes, int, bool], AnswerT],
    served: LoadedModel,
    body: bytes,
    deadline: float,
) -> AnswerT:
    """Run ``handler`` in the bounded thread pool. Waiting for a worker counts against the deadline;
    the work itself, once started, runs to the end (a thread cannot be interrupted, and abandoning
    it would leak threads under overload)."""
    try:
        ctx.limiter.acquire_nowait()  # a free worker is taken even when the deadline has just passed
    except anyio.WouldBlock:
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0.0)) as queue:
            await ctx.limiter.acquire()
        if queue.cancelled_caught:
            timeout = ctx.settings.request_timeout_seconds
            raise OverloadedError.retry_later(f"no worker became free within {timeout:g} s") from None
    try:
        return await anyio.to_thread.run_sync(handler, ctx, served, body, int(time.time()), True)
    finally:
        ctx.limiter.release()


async def respond(
    request: Request,
    ctx: AppContext,
    handler: BodyHandler,
    *,
    check: Callable[[str], None] = check_json,
    media_type: str = "application/json",
) -> Response:
    """Read the body and answer it with ``handler``: on the loop when it is small, else (or when
    it needs the store) in the thread pool."""
    served, body, deadline = await receive_body(request.scope, request.receive, ctx, check)
    if len(body) <= ctx.settings.inline_max_body_bytes:
        try:
            return Response(handler(ctx, served, body, int(time.time()), False), media_type=media_type)
        except StoreReadNeeded:
            pass  # a user without inline events: the store is read in a worker thread, below
    return Response(await offload(ctx, handler, served, body, deadline), media_type=media_type)
