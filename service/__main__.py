"""``python -m service --model PATH [--host H] [--port P]``: settings -> logging -> uvicorn.

Command-line flags override the ``PI_*`` environment variables (see :class:`service.config.Settings`).
With ``--workers N`` above 1 (the default is the CPUs this process may use) a parent process
shares one socket among N worker processes (``service/workers.py``); their metrics, readiness and
admin changes span all of them (``service/cluster.py``), so a scrape or a reload never depends
on which worker answers.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from service.auth import Access, TokenFileError, hash_token
from service.config import Settings
from service.logs import configure_logging
from service.workers import EXIT_LOAD_FAILED, Supervisor, per_worker, usable_cpus

if TYPE_CHECKING:
    from service.cluster import Cluster


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
    parser.add_argument(
        "--workers", type=int, help="worker processes (PI_WORKERS; default: the usable CPU count)"
    )
    args = parser.parse_args(argv)
    overrides = {
        "model_path": args.model,
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "workers": args.workers,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def _hash_token() -> int:
    """``python -m service hash-token``: a token on standard input -> the line's hash field."""
    token = sys.stdin.readline().strip()
    if not token:
        print("error: no token on standard input", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def _settings(overrides: dict[str, Any]) -> Settings | None:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            name = ".".join(str(p) for p in error["loc"])
            print(f"error: setting {name} (PI_{name.upper()}): {error['msg']}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["hash-token"]:
        return _hash_token()
    overrides = _parse_args(argv)
    settings = _settings(overrides)
    if settings is None:
        return 2
    workers = settings.workers if settings.workers is not None else usable_cpus()
    if workers == 1:
        return serve(overrides)
    configure_logging(settings.log_level)
    if settings.model_path is None:
        logging.getLogger("service").error("no model configured: pass --model PATH or set PI_MODEL_PATH")
        return 2
    if settings.tokens_file is not None:  # fail here, once, rather than in every worker
        try:
            Access(settings, CollectorRegistry())
        except (TokenFileError, OSError) as exc:
            logging.getLogger("service").error("cannot read PI_TOKENS_FILE: %s", exc)
            return 2
    return Supervisor(overrides, settings, workers).run()


def serve(
    overrides: dict[str, Any], *, cluster: Cluster | None = None, sock: socket.socket | None = None
) -> int:
    """One process serving: the whole service, or worker ``cluster.index`` of several on ``sock``."""
    # Imported here, not at the top: the parent of worker processes never serves, and would hold
    # the web stack and onnxruntime in memory for nothing.
    import uvicorn

    from service.app import create_app
    from service.http_protocol import with_head_timeout
    from service.lifecycle import ModelSlot
    from service.server import DrainingServer

    settings = _settings(overrides)
    if settings is None:
        return 2
    if cluster is not None:
        settings = settings.model_copy(update=per_worker(settings, cluster.size))
    configure_logging(settings.log_level, worker=None if cluster is None else cluster.index)
    if settings.model_path is None:
        logging.getLogger("service").error("no model configured: pass --model PATH or set PI_MODEL_PATH")
        return 2

    failures: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(reason: str) -> None:
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    slot = ModelSlot(None if cluster is None else cluster.generation)
    try:
        app = create_app(
            settings,
            on_load_failure=on_load_failure if settings.exit_on_load_failure else None,
            slot=slot,
            cluster=cluster,
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

    def drain() -> None:  # in the signal handler: plain stores only
        slot.drain()
        if cluster is not None:
            cluster.set_ready(False)

    server = DrainingServer(
        config,
        drain_seconds=settings.shutdown_drain_seconds,
        on_drain=drain,
        parent=None if cluster is None else os.getppid(),
    )
    # Everything imported and built so far lives as long as the process: move it out of the
    # collector's sight. Full collections scanning all of it were the /predict latency tail
    # (README, "Memory and pauses").
    gc.collect()
    gc.freeze()
    # A request allocates a few hundred tracked objects and frees nearly all of them by reference
    # counting; with the default trigger the young generation would be collected every couple of
    # requests for nothing.
    gc.set_threshold(50_000, 20, 100)
    server.run(sockets=None if sock is None else [sock])
    if failures:
        return 1 if cluster is None else EXIT_LOAD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
