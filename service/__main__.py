"""``python -m service --model PATH [--host H] [--port P]``: settings -> logging -> uvicorn.

Command-line flags override the ``PI_*`` environment variables (see :class:`service.config.Settings`).
One uvicorn worker per process on purpose: Prometheus counters live in the process, and several
workers behind one port would make a scrape sample one of them at random. Scale with replicas.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.auth import TokenFileError, hash_token
from service.config import Settings
from service.http_protocol import with_head_timeout
from service.lifecycle import ModelSlot
from service.logs import configure_logging
from service.server import DrainingServer


def _parse_args(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve purchase-intent predictions over HTTP. Every flag also has a PI_* "
        "environment variable (PI_MODEL_PATH, PI_HOST, PI_PORT, ...); flags win.",
    )
    parser.add_argument("--model", type=Path, help="the exported model.onnx (PI_MODEL_PATH)")
    parser.add_argument("--host", help="interface to bind (PI_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (PI_PORT, default 8000; 0 picks a free one)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="(PI_LOG_LEVEL)")
    args = parser.parse_args(argv)
    overrides = {"model_path": args.model, "host": args.host, "port": args.port, "log_level": args.log_level}
    return {k: v for k, v in overrides.items() if v is not None}


def _hash_token() -> int:
    """``python -m service hash-token``: a token on standard input -> the line's hash field."""
    token = sys.stdin.readline().strip()
    if not token:
        print("error: no token on standard input", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["hash-token"]:
        return _hash_token()
    overrides = _parse_args(argv)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            name = ".".join(str(p) for p in error["loc"])
            print(f"error: setting {name} (PI_{name.upper()}): {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.model_path is None:
        logging.getLogger("service").error("no model configured: pass --model PATH or set PI_MODEL_PATH")
        return 2

    failures: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(reason: str) -> None:
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    slot = ModelSlot()
    try:
        app = create_app(
            settings, on_load_failure=on_load_failure if settings.exit_on_load_failure else None, slot=slot
        )
    except (TokenFileError, OSError) as exc:  # the tokens file: unreadable or malformed
        logging.getLogger("service").error("cannot read PI_TOKENS_FILE: %s", exc)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_config=None,  # keep the JSON handlers configure_logging installed
        access_log=False,  # RequestMiddleware writes the access log
        # the drain comes out of the grace period: SIGTERM to exit takes at most the grace
        timeout_graceful_shutdown=settings.shutdown_grace_seconds - settings.shutdown_drain_seconds,
        server_header=False,
        http=with_head_timeout(settings.header_timeout_seconds),  # uvicorn has no header deadline
    )
    server = DrainingServer(config, drain_seconds=settings.shutdown_drain_seconds, on_drain=slot.drain)
    # Everything imported and built so far lives as long as the process: move it out of the
    # collector's sight. Full collections scanning all of it were the /predict latency tail
    # (README, "Memory and pauses").
    gc.collect()
    gc.freeze()
    # A request allocates a few hundred tracked objects and frees nearly all of them by reference
    # counting; with the default trigger the young generation would be collected every couple of
    # requests for nothing.
    gc.set_threshold(50_000, 20, 100)
    server.run()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
