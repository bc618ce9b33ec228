"""``python -m service --workers N``: one listening socket, N worker processes, one parent.

The parent binds the socket (so every worker accepts on the same one, and the kernel hands each
connection to whichever worker is free), creates the shared cells and a private run directory
(``service/cluster.py``), starts the workers and then only supervises: SIGTERM or SIGINT is passed
on to every worker, which drains as a single-process service does (readiness 503 first, requests
in flight finish); a worker that dies otherwise is started again and loads the models the others
serve. A worker that cannot load its model at start-up stops the whole service, as one process
would. The workers run in their own process group, so a Ctrl-C in a terminal reaches them once,
through the parent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from service.cluster import READY, Shared
from service.config import Settings

logger = logging.getLogger("service")

#: A worker's exit status when its model could not be loaded: the parent stops the service.
EXIT_LOAD_FAILED = 3
#: Seconds between the parent's checks on its workers.
SUPERVISE_INTERVAL_SECONDS = 0.2
#: A worker restarted within this long of its previous start waits before the next try, doubling
#: up to ``MAX_RESTART_DELAY_SECONDS``: a crash loop must not burn the CPU the others need.
QUICK_DEATH_SECONDS = 10.0
MAX_RESTART_DELAY_SECONDS = 10.0


def usable_cpus() -> int:
    """CPUs this process may use: the cgroup v2 CPU quota when one is set (a container's limit),
    else the affinity mask. ``os.cpu_count()`` would count the host's cores in a container."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


def per_worker(settings: Settings, workers: int) -> dict[str, Any]:
    """The settings each of ``workers`` processes gets, so that together they use what one
    process would: onnxruntime and batch threads divided (``workers x threads <= cores``) and each
    rate limit divided (each worker keeps its own buckets). Returns the changed fields."""
    cpus = usable_cpus()
    share = max(1, cpus // workers)
    changed: dict[str, Any] = {}
    if settings.intra_op_threads == 0 or settings.intra_op_threads > share:
        changed["intra_op_threads"] = share
    if settings.batch_threads > share:
        changed["batch_threads"] = share
    if settings.rate_limits:
        changed["rate_limits"] = {scope: rate / workers for scope, rate in settings.rate_limits.items()}
    return changed


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """The parent process; see the module docstring."""

    def __init__(self, overrides: dict[str, Any], settings: Settings, workers: int) -> None:
        self._overrides = overrides
        self._settings = settings
        self._workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._stopping = 0  # signals received
        self._signal = int(signal.SIGTERM)
        self._procs: list[BaseProcess | None] = [None] * workers
        self._started: list[float] = [0.0] * workers
        self._delay: list[float] = [0.0] * workers
        self._due: list[float] = [0.0] * workers

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._stopping += 1
        self._signal = sig
        for proc in self._procs:
            if proc is not None and proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)  # a second signal skips the rest of the drain

    def _start(self, index: int, sock: socket.socket, shared: Shared) -> None:
        proc = self._context.Process(
            target=worker_main,
            args=(index, self._overrides, sock, shared),
            name=f"purchase-intent-worker-{index}",
        )
        proc.start()
        self._procs[index] = proc
        self._started[index] = time.monotonic()

    def run(self) -> int:
        s = self._settings
        sock = bind(s.host, s.port)
        host, port = sock.getsockname()[:2]
        run_dir = Path(tempfile.mkdtemp(prefix="purchase-intent-"))
        cells = self._context.RawArray("q", READY + self._workers)
        shared = Shared(run_dir, self._workers, cells)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        logger.info(
            "serving with worker processes",
            extra={
                "workers": self._workers,
                "host": host,
                "port": port,
                "per_worker": per_worker(s, self._workers),
            },
        )
        status = 0
        try:
            for index in range(self._workers):
                self._start(index, sock, shared)
            status = self._supervise(sock, shared)
        finally:
            for proc in self._procs:
                if proc is not None and proc.is_alive():
                    proc.kill()
                    proc.join(5)
            sock.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        logger.info("all worker processes stopped", extra={"exit_status": status})
        return status

    def _supervise(self, sock: socket.socket, shared: Shared) -> int:
        status = 0
        while True:
            time.sleep(SUPERVISE_INTERVAL_SECONDS)
            alive = 0
            now = time.monotonic()
            for index, proc in enumerate(self._procs):
                if proc is None:
                    if not self._stopping and now >= self._due[index]:
                        self._start(index, sock, shared)
                        alive += 1
                    continue
                if proc.is_alive():
                    alive += 1
                    continue
                code = proc.exitcode
                proc.join()
                self._procs[index] = None
                shared.cells[READY + index] = 0
                if self._stopping:
                    # uvicorn re-raises the signal it caught once it has shut down
                    if code not in (0, None, -signal.SIGTERM, -signal.SIGINT):
                        status = 1
                    continue
                if code == EXIT_LOAD_FAILED:
                    logger.error("a worker process cannot load its model: stopping", extra={"worker": index})
                    self._on_signal(int(signal.SIGTERM), None)
                    status = 1
                    continue
                lived = now - self._started[index]
                delay = (
                    0.0
                    if lived > QUICK_DEATH_SECONDS
                    else min(MAX_RESTART_DELAY_SECONDS, max(0.5, 2 * self._delay[index]))
                )
                self._delay[index] = delay
                self._due[index] = now + delay
                logger.error(
                    "a worker process died; starting another",
                    extra={"worker": index, "exit_status": code, "restart_in_seconds": delay},
                )
            if self._stopping and alive == 0:
                return status


def worker_main(index: int, overrides: dict[str, Any], sock: socket.socket, shared: Shared) -> None:
    """A worker process: the whole service on the inherited socket (``service.__main__.serve``)."""
    from service.__main__ import serve
    from service.cluster import Cluster

    os.setpgrp()  # a terminal's Ctrl-C goes to the parent alone, which passes on one SIGTERM
    sys.exit(serve(overrides, cluster=Cluster(shared, index), sock=sock))
