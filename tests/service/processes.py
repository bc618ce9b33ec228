"""Real processes for end-to-end tests: ``python -m service`` and a Prometheus server, on loopback.

Each start is bounded in time and each process is stopped by the test that started it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import waiting

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def require_binary(name: str, package: str = "prometheus") -> str:
    """The path of ``name``; in CI (CI=true) a missing binary fails the test, locally it skips."""
    path = shutil.which(name)
    if path is None:
        message = f"'{name}' not found on PATH: install Debian's '{package}' (apt-get install -y {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a non-JSON line fails the test: logs must be JSON)."""
        lines = [line for line in self.log.read_text().splitlines() if line.strip()]
        return [json.loads(line) for line in lines]

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return int(self.process.returncode)


def start_service(model: Path, log: Path, *, env: dict[str, str] | None = None) -> ServiceProcess:
    port = free_port()
    # no drain by default: stopping a test server should not wait; shutdown tests set it
    full_env = {
        **os.environ,
        "PI_PROVIDERS": "cpu",
        "PI_WORKERS": "1",  # one process unless a test asks for more
        "PI_SHUTDOWN_DRAIN_SECONDS": "0",
        "PI_STORE_PATH": str(log.parent / f"{log.stem}.events.sqlite3"),  # a store per server
        **(env or {}),
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--model", str(model), "--host", HOST, "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    return ServiceProcess(process, f"http://{HOST}:{port}", log)


def wait_until(
    url: str, process: subprocess.Popen[bytes], *, timeout: float = 30.0, status: int = 200
) -> httpx.Response:
    """The first answer with ``status`` from ``url``; fails at once if ``process`` exits meanwhile."""
    last = "no answer"

    def answered() -> httpx.Response | None:
        nonlocal last
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} while waiting for {url}")
        try:
            r = httpx.get(url, timeout=2.0)
        except httpx.TransportError as exc:
            last = repr(exc)
            return None
        if r.status_code == status:
            return r
        last = f"{r.status_code} {r.text[:200]}"
        return None

    return waiting.wait_until(
        answered, timeout=timeout, interval=0.05, message=lambda: f"{url} not {status}: {last}"
    )


@contextmanager
def running_service(model: Path, log: Path, *, env: dict[str, str] | None = None) -> Iterator[ServiceProcess]:
    server = start_service(model, log, env=env)
    try:
        wait_until(f"{server.url}/readyz", server.process)
        yield server
    finally:
        server.stop()


@contextmanager
def running_prometheus(target: str, workdir: Path) -> Iterator[str]:
    """Prometheus on a free loopback port scraping ``target`` (host:port) every second."""
    binary = require_binary("prometheus")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: purchase-intent\n"
        "    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = workdir / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={HOST}:{port}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{HOST}:{port}"
    try:
        wait_until(f"{url}/-/ready", process, timeout=30)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@dataclass
class RedisProcess:
    """A real ``redis-server`` on loopback, append-only with an fsync per write (as deployed)."""

    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        import redis

        binary = require_binary("redis-server", package="redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", HOST,
                "--dir", str(self.workdir),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
                "--daemonize", "no",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        process = self.process
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1)

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"redis-server exited with {process.returncode}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            waiting.wait_until(answers, timeout=timeout, interval=0.05, message="redis-server not answering")
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


@contextmanager
def running_redis(workdir: Path, *extra_args: str) -> Iterator[RedisProcess]:
    server = RedisProcess(free_port(), workdir, extra_args=extra_args)
    server.start()
    try:
        yield server
    finally:
        server.stop()
