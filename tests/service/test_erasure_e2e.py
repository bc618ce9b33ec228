"""Erasure as a user would check it: a user's events stored, scored by id (so a prediction is
recorded too), then ``DELETE /users/{id}``; right after it answers, with the service and Redis
still running, no file of the store holds the id any more. SQLite (its file, WAL and shared
memory), Redis append-only (its append-only directory) and Redis with snapshots as well."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import TinyModel
from tests.service.processes import RedisProcess, running_redis, running_service
from tests.service.test_store_e2e import AS_OF, AUTH, TOKEN, cdnow_users

pytestmark = pytest.mark.slow

SECRET = "secret-user-xyz"


def files_holding(directory: Path, needle: bytes) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes())


def recorded(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith('purchase_intent_outcome_predictions_total{result="recorded"}')
    )
    return float(line.rsplit(" ", 1)[1])


@contextlib.contextmanager
def store_env(backend: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, RedisProcess | None]]:
    if backend == "sqlite":
        data = tmp_path / "store"
        yield {"PI_STORE_BACKEND": "sqlite", "PI_STORE_PATH": str(data / "events.sqlite3")}, data, None
        return
    # uncompressed snapshots, so that finding the id in a file before the erasure is a fair test
    extra = ("--rdbcompression", "no") + (("--save", "3600 1") if backend == "redis+snapshots" else ())
    data = tmp_path / "redis"
    with running_redis(data, *extra) as server:
        yield {"PI_STORE_BACKEND": "redis", "PI_REDIS_URL": server.url}, data, server


@pytest.mark.parametrize("backend", ["sqlite", "redis", "redis+snapshots"])
def test_right_after_an_erasure_no_store_file_holds_the_user(
    tiny_model_dir: TinyModel, tmp_path: Path, backend: str
) -> None:
    history = next(iter(cdnow_users(tiny_model_dir, 1).values()))
    others = cdnow_users(tiny_model_dir, 6)
    with store_env(backend, tmp_path) as (env, data, server):
        env |= {"PI_ADMIN_TOKEN": TOKEN, "PI_OUTCOMES_FLUSH_SECONDS": "0.1"}
        with (
            running_service(tiny_model_dir.model, tmp_path / "service.log", env=env) as service,
            httpx.Client(base_url=service.url, timeout=60) as client,
        ):
            events = [{"user_id": SECRET, **e} for e in history]
            events += [{"user_id": u, **e} for u, es in others.items() for e in es]
            assert client.post("/events", json={"events": events}).status_code == 200
            before = recorded(client)
            answer = client.post("/predict", json={"user_id": SECRET, "as_of": AS_OF})
            assert answer.status_code == 200
            deadline = time.monotonic() + 30
            while recorded(client) <= before:  # the prediction is written to the store too
                assert time.monotonic() < deadline, "the prediction was never recorded"
                time.sleep(0.05)
            if server is not None:  # the id in the rewritten base file too, not only in the log
                direct = redis.Redis.from_url(server.url)
                direct.bgrewriteaof()
                while (
                    direct.info("persistence")["aof_rewrite_in_progress"]
                    or not direct.info("persistence")["aof_rewrites"]
                ):
                    time.sleep(0.02)
                if backend == "redis+snapshots":
                    direct.bgsave()
                    while (
                        direct.info("persistence")["rdb_bgsave_in_progress"]
                        or not (data / "dump.rdb").exists()
                    ):
                        time.sleep(0.02)
                direct.close()
            holding = files_holding(data, SECRET.encode())
            assert holding, "the id should be on disk before the erasure, or this test proves nothing"
            if backend == "redis+snapshots":
                assert str(data / "dump.rdb") in holding

            erased = client.delete(f"/users/{SECRET}", headers=AUTH)
            assert erased.status_code == 200, erased.text
            assert erased.json() == {"user_id": SECRET, "deleted_events": len(history)}
            assert files_holding(data, SECRET.encode()) == []  # before anything else happens

            # the service goes on: the user is unknown, the others are still scored by id
            assert client.get("/healthz").status_code == 200
            assert client.post("/predict", json={"user_id": SECRET, "as_of": AS_OF}).status_code == 404
            for user in others:
                assert client.post("/predict", json={"user_id": user, "as_of": AS_OF}).status_code == 200
            again = client.delete(f"/users/{SECRET}", headers=AUTH)
            assert again.json()["deleted_events"] == 0
