"""uvicorn with a drain step, so a shutdown loses no request.

On the first SIGTERM (or SIGINT) ``/readyz`` turns 503 ``draining`` at once (the handler only
flips a flag), and for ``shutdown_drain_seconds`` everything is still served, new connections
included: load balancers see the 503 and stop routing here, where closing the socket first would
lose the requests already on their way. Then uvicorn's graceful shutdown lets
requests in flight finish, and what still runs when ``shutdown_grace_seconds`` are up is
cancelled. A second signal skips the rest of the drain.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

logger = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain_seconds: float,
        on_drain: Callable[[], None],
        parent: int | None = None,
    ) -> None:
        super().__init__(config)
        self._parent = parent  # a worker process's parent: if it goes, so does the worker
        self._drain_seconds = drain_seconds
        self._on_drain = on_drain
        self._drain_until: float | None = None
        self._drain_signal = int(signal.SIGTERM)
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: set flags only (no logging, no locks; on_tick does the rest).
        if self._drain_until is None and not self.should_exit:
            self._drain_until = time.monotonic() + self._drain_seconds
            self._drain_signal = sig
            self._on_drain()
            if self._drain_seconds > 0:
                return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._parent is not None and self._drain_until is None and os.getppid() != self._parent:
            logger.error("the parent process is gone: shutting down")
            self.handle_exit(int(signal.SIGTERM), None)
        if self._drain_until is not None:
            if not self._drain_logged:
                self._drain_logged = True
                logger.info(
                    "shutting down: readiness is 503, draining before the socket closes",
                    extra={
                        "signal": signal.Signals(self._drain_signal).name,
                        "drain_seconds": self._drain_seconds,
                        "grace_seconds": self.config.timeout_graceful_shutdown,
                    },
                )
            if not self.should_exit and time.monotonic() >= self._drain_until:
                super().handle_exit(self._drain_signal, None)  # uvicorn's graceful shutdown from here
        return await super().on_tick(counter)
