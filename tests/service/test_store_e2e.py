"""The event store with real processes: SIGKILL after acknowledged writes loses none of them
(SQLite: the service is killed; Redis: redis-server is killed under a service that stays up), and
two replicas sharing a real redis-server under concurrent writers and readers lose no event and
agree on every prediction. All serve the real tiny CDNOW model."""

from __future__ import annotations

import asyncio
import csv
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import waiting
from tests.conftest import TinyModel
from tests.service.processes import (
    RedisProcess,
    free_port,
    running_redis,
    running_service,
    start_service,
    wait_until,
)

pytestmark = pytest.mark.slow

TOKEN = "e2e-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AS_OF = "1997-09-30T00:00:00Z"


def cdnow_users(model: TinyModel, n: int) -> dict[str, list[dict[str, Any]]]:
    """``n`` real customers with several purchases each, every event with an id."""
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with model.events.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            events[row["user_id"]].append(
                {
                    "event_id": f"row-{i}",
                    "timestamp": row["timestamp"],
                    "amount": float(row["amount"]),
                    "quantity": int(row["quantity"]),
                }
            )
    chosen = sorted((u for u, e in events.items() if len(e) >= 3), key=lambda u: (-len(events[u]), u))[:n]
    return {u: events[u] for u in chosen}


def inline(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: e[k] for k in ("timestamp", "amount", "quantity")} for e in events]


def stored_events(client: httpx.Client, user: str) -> list[dict[str, Any]]:
    page = client.get(f"/users/{user}/events", params={"limit": 1000}, headers=AUTH).json()
    assert page["next_offset"] is None
    events: list[dict[str, Any]] = page["events"]
    return events


def test_sigkill_after_acknowledged_writes_loses_none_of_them(
    tiny_model_dir: TinyModel, tmp_path: Path
) -> None:
    users = cdnow_users(tiny_model_dir, 12)
    env = {"PI_ADMIN_TOKEN": TOKEN, "PI_STORE_PATH": str(tmp_path / "events.sqlite3")}
    acked: dict[str, set[str]] = defaultdict(set)
    stop = threading.Event()
    for run in range(3):
        server = start_service(tiny_model_dir.model, tmp_path / f"run{run}.log", env=env)
        try:
            wait_until(f"{server.url}/readyz", server.process)
            # one writer, one event per request, as fast as it can; SIGKILL lands mid-stream
            todo = [(u, e) for u, events in users.items() for e in events[run::3]]
            stop.clear()

            def write(url: str, todo: list[tuple[str, dict[str, Any]]]) -> None:
                with httpx.Client(base_url=url, timeout=10) as client:
                    for user, e in todo:
                        if stop.is_set():
                            return
                        try:
                            r = client.post("/events", json={"events": [{"user_id": user, **e}]})
                        except httpx.TransportError:
                            return  # killed before it answered: not acknowledged
                        if r.status_code == 200:
                            acked[user].add(e["event_id"])

            writer = threading.Thread(target=write, args=(server.url, todo))
            writer.start()
            while sum(map(len, acked.values())) < (run + 1) * 15 and writer.is_alive():
                stop.wait(0.005)
            server.process.send_signal(signal.SIGKILL)
            stop.set()
            writer.join(timeout=30)
        finally:
            server.process.kill()
            server.process.wait(timeout=10)
    assert sum(map(len, acked.values())) >= 45
    with (
        running_service(tiny_model_dir.model, tmp_path / "after.log", env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        for user, ids in acked.items():
            stored = stored_events(client, user)
            assert ids <= {e["event_id"] for e in stored}, user  # every acknowledged event survived
            by_id = client.post("/predict", json={"user_id": user, "as_of": AS_OF}).json()
            same = client.post(
                "/predict", json={"user_id": user, "as_of": AS_OF, "events": inline(stored)}
            ).json()
            assert by_id == same
    print(
        f"durability: 3 SIGKILLs mid-stream, {sum(map(len, acked.values()))} acknowledged events, all stored"
    )


def test_redis_sigkill_mid_stream_loses_no_acknowledged_write(
    tiny_model_dir: TinyModel, tmp_path: Path
) -> None:
    """redis-server (append-only, an fsync per write, as deployed) is SIGKILLed three times while one
    writer streams ``POST /events``. The service stays up: during each outage a write is a 503
    ``store_unavailable`` with Retry-After, never a 500 and never a 200; once redis-server is back on
    the same data dir, readiness returns by itself and every event acknowledged before, between and
    after the kills is stored. A killed process leaves its writes in the OS page cache: this proves
    that an acknowledgement waits for Redis's AOF (with ``--appendonly no`` it fails), not that the
    fsync happened, which only a power loss could show."""
    users = cdnow_users(tiny_model_dir, 12)
    longest = max(map(len, users.values()))
    # round-robin over users, so each kill lands between writes of many users
    todo = [(u, events[i]) for i in range(longest) for u, events in users.items() if i < len(events)]
    redis = RedisProcess(free_port(), tmp_path / "redis")
    env = {"PI_ADMIN_TOKEN": TOKEN, "PI_STORE_BACKEND": "redis", "PI_REDIS_URL": redis.url}
    server = start_service(tiny_model_dir.model, tmp_path / "service.log", env=env)
    acked: dict[str, set[str]] = defaultdict(set)
    kills = 3
    # 503 store_unavailable answers by the number of kills so far: [0] while redis-server was never down
    unavailable = [0] * (kills + 1)
    phase = [0]
    unexpected: list[str] = []
    stop = threading.Event()

    acked_lock = threading.Lock()  # the writer adds users while the main thread counts

    def n_acked() -> int:
        with acked_lock:
            return sum(map(len, acked.values()))

    def refused_now() -> int:
        return unavailable[phase[0]]

    def wait_for_writer(count: Callable[[], int], at_least: int, what: str) -> None:
        """Until ``count()`` reaches ``at_least`` or the writer stops (the asserts after it say why)."""
        waiting.wait_until(
            lambda: count() >= at_least or not writer.is_alive(),
            timeout=10,
            interval=0.005,
            message=lambda: f"{what}: {n_acked()} acked, 503s {unavailable}, {unexpected[:3]}",
        )

    def write() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for user, e in todo:
                if stop.is_set():
                    return
                try:
                    r = client.post("/events", json={"events": [{"user_id": user, **e}]})
                except httpx.TransportError as exc:
                    unexpected.append(f"no answer from the service: {exc!r}")
                    return
                json_body = r.headers.get("content-type", "").startswith("application/json")
                if r.status_code == 200:
                    with acked_lock:
                        acked[user].add(e["event_id"])
                elif (
                    r.status_code == 503
                    and json_body
                    and r.json().get("error") == "store_unavailable"
                    and r.headers.get("Retry-After")
                ):
                    unavailable[phase[0]] += 1
                else:
                    unexpected.append(
                        f"{r.status_code} Retry-After={r.headers.get('Retry-After')} {r.text[:300]}"
                    )
                    return

    writer = threading.Thread(target=write)
    started = time.monotonic()
    try:
        redis.start()
        wait_until(f"{server.url}/readyz", server.process)
        writer.start()
        for kill in range(1, kills + 1):
            target = n_acked() + 15
            wait_for_writer(n_acked, target, f"writes stalled before kill {kill}")
            assert n_acked() >= target, f"writes stalled before kill {kill}: {n_acked()} acked, {unexpected}"
            phase[0] = kill
            redis.stop(signal.SIGKILL)
            # the outage lasts until the writer has been refused a few times
            wait_for_writer(refused_now, 3, f"outage {kill}: too few writes refused")
            assert unavailable[kill] >= 3, f"outage {kill}: {unavailable[kill]} 503s in 10 s; {unexpected}"
            ready = httpx.get(f"{server.url}/readyz", timeout=5)
            assert (ready.status_code, ready.json()["status"]) == (503, "store_unavailable"), ready.text
            redis.start()
            wait_until(f"{server.url}/readyz", server.process, timeout=10)
        target = n_acked() + 15
        wait_for_writer(n_acked, target, "writes did not resume after the last restart")
        stop.set()
        writer.join(timeout=30)
        assert not unexpected, unexpected[:3]
        assert n_acked() >= target, f"writes did not resume after the last restart: {n_acked()} acked"
        assert server.process.poll() is None, "the service died with redis-server"
        lost: dict[str, set[str]] = {}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for user, ids in acked.items():
                stored = stored_events(client, user)
                if missing := ids - {e["event_id"] for e in stored}:
                    lost[user] = missing
                    continue
                by_id = client.post("/predict", json={"user_id": user, "as_of": AS_OF}).json()
                same = client.post(
                    "/predict", json={"user_id": user, "as_of": AS_OF, "events": inline(stored)}
                ).json()
                assert by_id == same, user
        sample = {u: sorted(ids)[:5] for u, ids in list(lost.items())[:3]}
        assert not lost, (
            f"{sum(map(len, lost.values()))} of {n_acked()} acknowledged events lost after SIGKILLs of "
            f"redis-server, for {len(lost)} users: {sample}"
        )
    finally:
        stop.set()
        if writer.is_alive():
            writer.join(timeout=30)
        server.stop()
        redis.stop()
    print(
        f"redis durability: {kills} SIGKILLs of redis-server mid-stream, {n_acked()} acknowledged "
        f"events, all stored; 503 store_unavailable before and after each kill: {unavailable}; "
        f"{time.monotonic() - started:.1f} s"
    )


def test_two_replicas_on_redis_lose_no_event_and_agree(tiny_model_dir: TinyModel, tmp_path: Path) -> None:
    users = cdnow_users(tiny_model_dir, 8)
    with running_redis(tmp_path / "redis") as redis:
        env = {"PI_ADMIN_TOKEN": TOKEN, "PI_STORE_BACKEND": "redis", "PI_REDIS_URL": redis.url}
        with (
            running_service(tiny_model_dir.model, tmp_path / "a.log", env=env) as a,
            running_service(tiny_model_dir.model, tmp_path / "b.log", env=env) as b,
        ):
            errors: list[str] = []
            counts = {"stored": 0, "duplicates": 0, "reads": 0}
            lock = threading.Lock()
            done = threading.Event()

            def writer(k: int) -> None:
                # each writer sends every user's events in its own order, to both replicas in turn:
                # four writers race on the same ids, so three of every four sends are duplicates
                order = list(users.items())[k:] + list(users.items())[:k]
                with httpx.Client(timeout=30) as client:
                    for j, (user, events) in enumerate(order):
                        url = (a, b)[(j + k) % 2].url
                        for start in range(0, len(events), 4):
                            body = {"events": [{"user_id": user, **e} for e in events[start : start + 4]]}
                            r = client.post(f"{url}/events", json=body)
                            if r.status_code != 200:
                                errors.append(r.text)
                                return
                            with lock:
                                counts["stored"] += r.json()["stored"]
                                counts["duplicates"] += r.json()["duplicates"]

            def reader(url: str) -> None:
                with httpx.Client(base_url=url, timeout=30) as client:
                    while not done.is_set():
                        body = {"users": [{"user_id": u, "as_of": AS_OF} for u in users]}
                        r = client.post("/predict/batch", json=body)
                        if r.status_code not in (200, 404):  # 404 until every user has an event
                            errors.append(r.text)
                            return
                        with lock:
                            counts["reads"] += 1

            writers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
            readers = [threading.Thread(target=reader, args=(s.url,)) for s in (a, b)]
            for t in writers + readers:
                t.start()
            for t in writers:
                t.join(timeout=120)
            done.set()
            for t in readers:
                t.join(timeout=30)
            assert not errors, errors[:3]
            total = sum(len(e) for e in users.values())
            assert counts["stored"] == total
            assert counts["duplicates"] == 3 * total
            with httpx.Client(timeout=30) as client:
                for user, events in users.items():
                    page = client.get(f"{a.url}/users/{user}/events", params={"limit": 1000}, headers=AUTH)
                    stored = page.json()["events"]
                    assert {e["event_id"] for e in stored} == {e["event_id"] for e in events}
                body = {"users": [{"user_id": u, "as_of": AS_OF} for u in users]}
                from_a = client.post(f"{a.url}/predict/batch", json=body).json()["predictions"]
                from_b = client.post(f"{b.url}/predict/batch", json=body).json()["predictions"]
                want = client.post(
                    f"{a.url}/predict/batch",
                    json={
                        "users": [
                            {"user_id": u, "as_of": AS_OF, "events": inline(e)} for u, e in users.items()
                        ]
                    },
                ).json()["predictions"]
                assert from_a == from_b == want
    print(
        f"replicas: {4 * total} events sent by 4 writers to 2 replicas, {total} stored, "
        f"{counts['reads']} batch reads"
    )


def _store_reads(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name.endswith("_store_operation_duration_seconds_count") and sample.labels == {
                "operation": "read"
            }:
                return float(sample.value)
    raise AssertionError("no store read latency exported")


def test_concurrent_predictions_by_id_share_store_reads_and_equal_inline(
    tiny_model_dir: TinyModel, tmp_path: Path
) -> None:
    users = cdnow_users(tiny_model_dir, 12)
    env = {"PI_ADMIN_TOKEN": TOKEN, "PI_STORE_PATH": str(tmp_path / "events.sqlite3")}
    with running_service(tiny_model_dir.model, tmp_path / "service.log", env=env) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for user, events in users.items():
                r = client.post("/events", json={"events": [{"user_id": user, **e} for e in events]})
                assert r.status_code == 200, r.text
            want = {
                user: client.post(
                    "/predict", json={"user_id": user, "as_of": AS_OF, "events": inline(events)}
                ).json()["probability"]
                for user, events in users.items()
            }
            before = _store_reads(client)

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=32)
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as client:
                return await asyncio.gather(
                    *(client.post("/predict", json={"user_id": u, "as_of": AS_OF}) for u in list(users) * 8)
                )

        answers = asyncio.run(burst())
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reads = _store_reads(client) - before
    assert [r.status_code for r in answers] == [200] * len(answers)
    for r in answers:
        body = r.json()
        assert abs(body["probability"] - want[body["user_id"]]) <= 1e-6, body
    assert reads < len(answers), f"{reads:.0f} store reads for {len(answers)} requests: none were shared"
