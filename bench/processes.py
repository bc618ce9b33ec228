"""Servers the bench starts: a free loopback port, a bounded wait for readiness, a sure stop, RSS.

Servers run in their own session (process group), so a Ctrl-C in the terminal reaches only the
bench, which then stops them itself: SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"


class StartError(RuntimeError):
    """A server exited or did not become ready in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(
    name: str, argv: list[str], port: int, log: Path, *, cwd: Path, env: dict[str, str] | None = None
) -> Server:
    """Start ``argv`` (which must listen on ``port``) in ``cwd``, with its output in ``log``."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            # one worker process unless the bench asks for more: the floors it is compared with
            # are one process each
            env={"PI_WORKERS": "1", **os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    return Server(name, process, f"http://{HOST}:{port}", log)


def start_service(
    name: str, model: Path, workdir: Path, env: dict[str, str], *, cwd: Path, ready_timeout: float = 60.0
) -> Server:
    """``python -m service`` on ``model`` on a free port, its log ``workdir/<name>.log``, ready."""
    port = free_port()
    argv = [sys.executable, "-m", "service", "--model", str(model), "--host", HOST, "--port", str(port)]
    server = start(name, argv, port, workdir / f"{name}.log", cwd=cwd, env=env)
    try:
        wait_ready(server, timeout=ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(server: Server, path: str = "/readyz", timeout: float = 60.0) -> None:
    """Poll ``path`` until it answers 200; raise :class:`StartError` on exit or timeout."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise StartError(
                f"{server.name} exited with {server.process.returncode} before it was ready:\n"
                f"{server.log_tail()}"
            )
        try:
            # http://127.0.0.1: a server this bench started
            with urllib.request.urlopen(server.url + path, timeout=2.0) as response:  # nosec B310
                if response.status == 200:
                    return
                last = str(response.status)
        except urllib.error.HTTPError as exc:
            last = str(exc.code)
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise StartError(f"{server.name}: {path} not 200 after {timeout}s ({last}):\n{server.log_tail()}")


def post(
    url: str, body: bytes, content_type: str = "application/json", timeout: float = 30.0
) -> tuple[int, bytes]:
    """One POST of a body (JSON by default); the status and the response body, also for error statuses."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        # http://127.0.0.1: a server this bench started
        with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec B310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class _Sampler:
    """Calls :meth:`_sample` every ``interval_s`` in a thread, from ``with`` to its end."""

    interval_s: float = 0.05
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._sample():
                self.samples += 1
            self._stop.wait(self.interval_s)

    def _sample(self) -> bool:
        raise NotImplementedError


@dataclass(kw_only=True)
class RssSampler(_Sampler):
    """Samples a process's ``VmRSS`` from /proc in a thread; ``VmHWM`` is the kernel's own peak."""

    pid: int
    peak_kib: int = 0

    def _sample(self) -> bool:
        rss = _status_kib(self.pid, "VmRSS")
        if rss is not None:
            self.peak_kib = max(self.peak_kib, rss)
        return rss is not None

    def high_water_mark_kib(self) -> int | None:
        """The kernel's peak RSS of the process so far (read it before the process exits)."""
        return _status_kib(self.pid, "VmHWM")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children, theirs, and so on)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parent = int(text.rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        children.setdefault(parent, []).append(int(text.split(" ", 1)[0]))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


def _rollup_kib(pid: int) -> tuple[int, int] | None:
    """``(Rss, Pss)`` of a process from ``smaps_rollup``."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return None
    return (values["Rss"], values["Pss"]) if len(values) == 2 else None


@dataclass(kw_only=True)
class TreeSampler(_Sampler):
    """Samples the memory of every process below ``pid`` (a job and, for Ray, its raylet, GCS,
    agents and workers). Σ PSS shares each page among the processes that map it, so a page shared
    by several (libraries, Ray's object store) counts once; Σ RSS counts it in each."""

    pid: int
    interval_s: float = 0.25  # /proc walks cost CPU the job would use
    peak_pss_kib: int = 0
    peak_rss_kib: int = 0
    most_processes: int = 0

    def _sample(self) -> bool:
        rollups = [r for r in map(_rollup_kib, descendants(self.pid)) if r is not None]
        if not rollups:
            return False
        self.peak_rss_kib = max(self.peak_rss_kib, sum(rss for rss, _ in rollups))
        self.peak_pss_kib = max(self.peak_pss_kib, sum(pss for _, pss in rollups))
        self.most_processes = max(self.most_processes, len(rollups))
        return True
