"""Service fixtures: settings -> registry -> predictor -> app -> client (a fake predictor by default).

End-to-end fixtures (a real ``python -m service`` process on the real tiny model) live in
``test_e2e.py``; they build on the suite-wide ``tiny_model_dir`` from ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests import waiting
from tests.service.fakes import FakePredictor

MAX_USERS = 8
MAX_EVENTS = 50


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    waiting.wait_until(
        lambda: client.get("/readyz").status_code == 200,
        timeout=timeout,
        interval=0.005,
        message=lambda: f"not ready: {client.get('/readyz').json()}",
    )


@pytest.fixture(autouse=True)
def _store_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every app a test builds keeps its SQLite event store in the test's own directory."""
    monkeypatch.setenv("PI_STORE_PATH", str(tmp_path / "events.sqlite3"))


@pytest.fixture
def settings() -> Settings:
    return Settings(
        providers=("CPUExecutionProvider",),
        max_batch_users=MAX_USERS,
        max_events_per_user=MAX_EVENTS,
    )


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def predictor() -> FakePredictor:
    return FakePredictor(max_batch=MAX_USERS)


@pytest.fixture
def app(settings: Settings, predictor: FakePredictor, registry: CollectorRegistry) -> FastAPI:
    return create_app(settings, predictor=predictor, registry=registry)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c
