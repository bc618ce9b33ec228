"""The typed client (``service.client``) against a real server process: every call, sync and async,
the typed errors with the envelope, readiness waiting, and the 503 + ``Retry-After`` retry path
(a slow sender holds the only admission slot, so the next prediction is shed until it finishes)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest

from service.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    Columns,
    Event,
    InvalidRequestError,
    NotFoundError,
    Retry,
    StoredEvent,
    TooLargeError,
    UnavailableError,
    User,
)
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service, start_service
from tests.service.wire import connect, head, read_response

pytestmark = pytest.mark.slow

AS_OF = datetime(1997, 9, 30, tzinfo=UTC)
MAX_USERS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Iterator[ServiceProcess]:
    tmp = tmp_path_factory.mktemp("client")
    with running_service(model, tmp / "service.log", env={"PI_MAX_BATCH_USERS": str(MAX_USERS)}) as proc:
        yield proc


def _users() -> list[User]:
    rng = np.random.default_rng(7)
    users = []
    for i in range(5):
        days = sorted(rng.integers(9_500, 10_100, int(rng.integers(0, 12))))
        events = [
            Event(int(d) * 86_400 + 3_600, round(float(rng.gamma(2, 15)), 2), int(rng.integers(1, 4)))
            for d in days
        ]
        users.append(User(f"u-{i}", events, AS_OF))
    return users


def test_every_prediction_format_gives_the_same_answer(server: ServiceProcess) -> None:
    users = _users()
    with Client(server.url) as client:
        ready = client.wait_ready(timeout=10)
        assert ready.ready
        info = client.model_info()
        assert info.model_version == ready.model_version
        assert info.feature_spec["lookback_bins"] > 0
        rows = client.predict_batch(users)
        columns = client.predict_columns(Columns.from_users(users))
        singles = [client.predict(u) for u in users]
        table = pa.table(
            {
                "user_id": [u.user_id for u in users],
                "as_of": pa.array([AS_OF] * len(users), type=pa.timestamp("s", tz="UTC")),
                "events": [
                    [
                        {"timestamp": e.timestamp, "amount": e.amount, "quantity": e.quantity}
                        for e in u.events or ()
                    ]
                    for u in users
                ],
            },
            schema=pa.schema(
                [
                    ("user_id", pa.string()),
                    ("as_of", pa.timestamp("s", tz="UTC")),
                    (
                        "events",
                        pa.list_(
                            pa.struct(
                                [
                                    ("timestamp", pa.int64()),
                                    ("amount", pa.float64()),
                                    ("quantity", pa.int64()),
                                ]
                            )
                        ),
                    ),
                ]
            ),
        )
        arrow = client.predict_arrow(table)
    assert rows.user_id == columns.user_id == [u.user_id for u in users]
    assert rows.probability == columns.probability == [s.probability for s in singles]
    assert arrow.column("probability").to_pylist() == np.asarray(rows.probability, dtype=np.float32).tolist()
    assert [p.will_purchase for p in rows] == columns.will_purchase
    assert all(s.model_version == info.model_version for s in singles)
    assert len(rows) == len(users)


def test_stored_events_then_a_prediction_by_id(server: ServiceProcess) -> None:
    user = _users()[1]
    events = [
        StoredEvent(user.user_id + "-stored", e.timestamp, e.amount, e.quantity) for e in user.events or ()
    ]
    with Client(server.url) as client:
        assert client.send_events(events).stored == len(events)
        again = client.send_events(events)
        assert (again.stored, again.duplicates) == (0, len(events))
        by_id = client.predict(User(user.user_id + "-stored", as_of=AS_OF))
        inline = client.predict(User(user.user_id + "-stored", user.events, AS_OF))
    assert by_id.probability == inline.probability


def test_errors_carry_the_envelope(server: ServiceProcess) -> None:
    with Client(server.url) as client:
        with pytest.raises(InvalidRequestError) as bad:
            client.predict(User("u", [Event(AS_OF, -1.0, 1)], AS_OF))
        assert bad.value.status == 422
        assert bad.value.code == "invalid_input"
        assert [d.field for d in bad.value.detail] == ["events[0].amount"]
        with pytest.raises(NotFoundError) as unknown:
            client.predict(User("nobody-here", as_of=AS_OF))
        assert unknown.value.code == "unknown_user"
        with pytest.raises(TooLargeError) as large:
            client.predict_batch([User(f"u{i}", [], AS_OF) for i in range(MAX_USERS + 1)])
        assert large.value.code == "too_many_users"


def _hold_the_only_slot(url: str) -> tuple[threading.Thread, threading.Event]:
    """A slow sender: it announces a body and sends half, holding the one admission slot until
    ``release`` is set; then it sends the rest and reads its answer."""
    body = b'{"users": []}'
    sock = connect(url)
    sock.sendall(
        head("/predict/batch", {"Content-Type": "application/json", "Content-Length": str(len(body))})
    )
    sock.sendall(body[:5])
    release = threading.Event()

    def finish() -> None:
        release.wait(30)
        sock.sendall(body[5:])
        read_response(sock)
        sock.close()

    thread = threading.Thread(target=finish)
    thread.start()
    return thread, release


def test_a_503_is_retried_after_retry_after(tmp_path: Path, model: Path) -> None:
    env = {"PI_MAX_CONCURRENT_REQUESTS": "1"}
    with running_service(model, tmp_path / "service.log", env=env) as server:
        user = _users()[0]
        thread, release = _hold_the_only_slot(server.url)
        try:
            time.sleep(0.2)  # the half body has reached the server
            with Client(server.url, retry=NO_RETRY) as client, pytest.raises(UnavailableError) as shed:
                client.predict(user)
            assert shed.value.code == "overloaded"
            assert shed.value.retry_after == 1.0
            # V2 inference counts against the same limit
            v2 = httpx.post(f"{server.url}/v2/models/purchase-intent/infer", json={"inputs": []})
            assert v2.status_code == 503
            assert v2.headers["retry-after"] == "1"
            assert v2.json()["error"] == "overloaded"
            # freed while the client waits out Retry-After: its second attempt goes through
            threading.Timer(0.3, release.set).start()
            started = time.monotonic()
            with Client(server.url, retry=Retry(attempts=3, backoff_s=0.01)) as client:
                answer = client.predict(user)
            assert time.monotonic() - started >= 1.0  # it waited the server's Retry-After
            assert 0.0 <= answer.probability <= 1.0
            thread.join(30)

            # the async client: the same, awaited
            thread, release = _hold_the_only_slot(server.url)
            time.sleep(0.2)

            async def retried() -> float:
                async with AsyncClient(server.url, retry=NO_RETRY) as once:
                    with pytest.raises(UnavailableError):
                        await once.predict(user)
                loop = asyncio.get_running_loop()
                loop.call_later(0.3, release.set)
                async with AsyncClient(server.url, retry=Retry(attempts=3, backoff_s=0.01)) as client:
                    return (await client.predict(user)).probability

            started = time.monotonic()
            assert asyncio.run(retried()) == answer.probability
            assert time.monotonic() - started >= 1.0
        finally:
            release.set()
            thread.join(30)


def test_wait_ready_covers_a_server_still_starting(tmp_path: Path, model: Path) -> None:
    server = start_service(model, tmp_path / "service.log")
    try:
        with Client(server.url) as client:
            assert client.wait_ready(timeout=30, interval=0.05).ready
        with Client("http://127.0.0.1:9") as nobody, pytest.raises(TimeoutError, match="not ready within"):
            nobody.wait_ready(timeout=0.3)
    finally:
        server.stop()


def test_the_async_client(server: ServiceProcess) -> None:
    users = _users()

    async def run() -> None:
        async with AsyncClient(server.url) as client:
            assert (await client.wait_ready(timeout=10)).ready
            assert (await client.model_info()).model_version
            together = await asyncio.gather(*(client.predict(u) for u in users))
            columns = await client.predict_columns(Columns.from_users(users))
            assert [p.probability for p in together] == columns.probability
            with pytest.raises(InvalidRequestError) as bad:
                await client.predict_batch([User("u", [Event("yesterday", 1.0, 1)], AS_OF)])
            assert bad.value.detail[0].field == "users[0].events[0].timestamp"

    asyncio.run(run())
