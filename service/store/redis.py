"""The backend for several replicas: one Redis shared by all of them.

Per user two hashes: ``<prefix>ev:<user_id>`` maps event key -> ``"ts|amount|quantity|ingested_at"``
and ``<prefix>fold:<user_id>`` holds the folded counters. A write is one ``MULTI``/``EXEC`` of
``HSETNX`` (a duplicate key answers 0), a batch read one pipelined ``MULTI``/``EXEC`` for every
user (one round trip, one consistent view against a concurrent compaction).

Durability is Redis's: acknowledged means ``EXEC`` returned, which survives a crash of Redis only
with ``appendonly yes`` and ``appendfsync always`` (what docker-compose.yml and the tests run).

Recorded predictions live in ``<prefix>pred:<user_id>`` (field ``[day, version]`` as JSON), the
truth; three sorted sets index them by horizon end (unsettled, settled) and by recording time. A
small Lua script writes a hash field and its index entries together; an index entry whose field is
gone (the user was erased meanwhile) is dropped when met. ``<prefix>clock`` holds the event clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import redis

from service.cleaning import exact_duplicates
from service.columns import Folded
from service.store.base import (
    Appended,
    Backlog,
    Compacted,
    History,
    NewEvent,
    Page,
    Prediction,
    Settled,
    StoredEvent,
)

_SECONDS_PER_DAY = 86_400
_FOLD_FIELDS = ("purchase_days", "first_day", "last_day", "amount", "quantity")
_COMPACT_RETRIES = 5
_CHUNK = 1000  # index entries per pipelined round trip
_CLOCK_MEMBER = "events"

# KEYS: the user's prediction hash, the unsettled index, the recording-time index.
# ARGV: field, value, index member, horizon end, recording time.
_RECORD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
  return 1
end
return 0
"""
# KEYS: the user's prediction hash, the unsettled index, the settled index, the recording index.
# ARGV: field, value, index member, horizon end, "1" when the outcome is known (else: forget it).
_SETTLE = """
redis.call('ZREM', KEYS[2], ARGV[3])
if ARGV[5] ~= '1' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[3])
  return 0
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  return 1
end
return 0
"""


def _field(p: Prediction) -> str:
    return json.dumps([p.day, p.model_version])


def _member(p: Prediction) -> str:
    return json.dumps([p.user_id, p.day, p.model_version])


def _value(p: Prediction) -> str:
    return json.dumps([p.as_of, p.horizon_days, p.probability, p.requested_at, p.outcome])


def _prediction(member: bytes, value: bytes) -> Prediction:
    user_id, _, version = json.loads(member)
    as_of, horizon_days, probability, requested_at, outcome = json.loads(value)
    return Prediction(user_id, version, as_of, horizon_days, probability, requested_at, outcome)


def _chunks(items: list[bytes]) -> list[list[bytes]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _pack(e: NewEvent, now: float) -> str:
    return f"{e.timestamp}|{float(e.amount)!r}|{e.quantity}|{now!r}"


def _unpack(raw: bytes) -> tuple[int, float, int, float]:
    ts, amount, quantity, ingested = raw.decode().split("|")
    return int(ts), float(amount), int(quantity), float(ingested)


def _folded(raw: dict[bytes, bytes]) -> Folded | None:
    if not raw:
        return None
    v = {k.decode(): x.decode() for k, x in raw.items()}
    return Folded(
        int(v["purchase_days"]),
        int(v["first_day"]),
        int(v["last_day"]),
        float(v["amount"]),
        float(v["quantity"]),
    )


def _due(
    rows: dict[bytes, tuple[int, float, int, float]], before_day: int, ingested_before: float
) -> dict[bytes, tuple[int, float, int, float]]:
    """The events to fold: whole days before ``before_day`` whose every event is old enough (the
    SQLite backend's rule, so no day is left half folded and half raw)."""
    recent = {r[0] // _SECONDS_PER_DAY for r in rows.values() if r[3] >= ingested_before}
    return {
        k: r
        for k, r in rows.items()
        if r[0] // _SECONDS_PER_DAY < before_day and r[0] // _SECONDS_PER_DAY not in recent
    }


def _fold(rows: list[tuple[int, float, int, float]]) -> Folded:
    """One user's events as counters, by :mod:`service.cleaning`'s rule (identical events once)."""
    ts = np.array([r[0] for r in rows], dtype=np.int64)
    amounts = np.array([r[1] for r in rows], dtype=np.float64)
    quantities = np.array([r[2] for r in rows], dtype=np.float64)
    once = ~exact_duplicates(np.zeros(ts.size, dtype=np.int64), ts, amounts, quantities)
    days = ts[once] // _SECONDS_PER_DAY
    return Folded(
        int(np.unique(days).size),
        int(days.min()),
        int(days.max()),
        float(amounts[once].sum()),
        float(quantities[once].sum()),
    )


class RedisStore:
    backend = "redis"

    def __init__(self, url: str, *, prefix: str, timeout: float, persist_timeout: float = 60.0) -> None:
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30
        )
        self._prefix = prefix
        self._record_script = self._client.register_script(_RECORD)
        self._settle_script = self._client.register_script(_SETTLE)
        self._clock_key = f"{prefix}clock"
        self._due_key = f"{prefix}pred-due"
        self._settled_key = f"{prefix}pred-settled"
        self._recorded_key = f"{prefix}pred-recorded"
        self._persist_timeout = persist_timeout
        # an erasure whose rewrite did not finish: the next erase redoes it, even of an unknown user
        self._unpersisted = False

    def _events_key(self, user_id: str) -> str:
        return f"{self._prefix}ev:{user_id}"

    def _fold_key(self, user_id: str) -> str:
        return f"{self._prefix}fold:{user_id}"

    def _predictions_key(self, user_id: str) -> str:
        return f"{self._prefix}pred:{user_id}"

    def append(self, events: Sequence[NewEvent], now: float) -> Appended:
        if not events:
            return Appended(0, 0)
        pipe = self._client.pipeline(transaction=True)
        for e in events:
            pipe.hsetnx(self._events_key(e.user_id), e.key, _pack(e, now))
        pipe.zadd(self._clock_key, {_CLOCK_MEMBER: max(e.timestamp for e in events)}, gt=True)
        results: list[Any] = pipe.execute()
        stored = sum(int(r) for r in results[:-1])
        return Appended(stored=stored, duplicates=len(events) - stored)

    def histories(self, user_ids: Sequence[str]) -> dict[str, History]:
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        pipe = self._client.pipeline(transaction=True)
        for user_id in ids:
            pipe.hvals(self._events_key(user_id))
            pipe.hgetall(self._fold_key(user_id))
        results: list[Any] = pipe.execute()
        out: dict[str, History] = {}
        for i, user_id in enumerate(ids):
            values: list[bytes] = results[2 * i]
            folded = _folded(results[2 * i + 1])
            if not values and folded is None:
                continue
            rows = [_unpack(v) for v in values]
            out[user_id] = History([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], folded)
        return out

    def page(self, user_id: str, offset: int, limit: int) -> Page | None:
        pipe = self._client.pipeline(transaction=True)
        pipe.hgetall(self._events_key(user_id))
        pipe.hgetall(self._fold_key(user_id))
        raw_events, raw_fold = pipe.execute()
        folded = _folded(raw_fold)
        if not raw_events and folded is None:
            return None
        events = sorted(
            (StoredEvent(k.decode(), *_unpack(v)) for k, v in raw_events.items()),
            key=lambda e: (e.timestamp, e.key),
        )
        return Page(events[offset : offset + limit], len(events), folded)

    def erase(self, user_id: str) -> int:
        predictions = self._predictions_key(user_id)
        with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # a prediction recorded between reading its fields and deleting would leave
                    # its index entries (which name the user) behind: EXEC fails instead, and we retry
                    pipe.watch(predictions)  # type: ignore[no-untyped-call]
                    fields: list[bytes] = pipe.hkeys(predictions)  # type: ignore[assignment]
                    members = [json.dumps([user_id, *json.loads(f)]) for f in fields]
                    pipe.multi()
                    pipe.hlen(self._events_key(user_id))
                    pipe.delete(self._events_key(user_id), self._fold_key(user_id), predictions)
                    for key in (self._due_key, self._settled_key, self._recorded_key) if members else ():
                        pipe.zrem(key, *members)
                    count = int(pipe.execute()[0])
                    break
                except redis.WatchError:
                    continue
        if count or members or self._unpersisted:
            self._unpersisted = True
            self._persist_erasure()
            self._unpersisted = False
        return count

    def _persist_erasure(self) -> None:
        """Rewrite what Redis keeps on disk, so the deleted keys leave it now rather than at the
        next automatic rewrite: the append-only file (its old increments hold every write), and the
        snapshot if one is configured. Waits for a rewrite started after the delete (one already
        running forked before it, so Redis queues another and both are waited for)."""
        deadline = time.monotonic() + self._persist_timeout
        info: dict[str, Any] = self._client.info("persistence")
        if int(info.get("aof_enabled", 0)):
            done = int(info["aof_rewrites"])
            self._client.bgrewriteaof()
            self._wait_persisted(deadline, "aof_rewrite", lambda i: int(i["aof_rewrites"]) > done)
            if self._client.info("persistence").get("aof_last_bgrewrite_status") != "ok":
                raise redis.RedisError("append-only file rewrite failed: erased keys may remain on disk")
        if self._snapshots_configured():
            info = self._client.info("persistence")
            # a save already running forked before the delete: SCHEDULE queues one after it
            wanted = int(info["rdb_saves"]) + (2 if int(info["rdb_bgsave_in_progress"]) else 1)
            self._client.bgsave(schedule=True)
            self._wait_persisted(deadline, "rdb_bgsave", lambda i: int(i["rdb_saves"]) >= wanted)

    def _snapshots_configured(self) -> bool:
        try:
            save = self._client.config_get("save").get("save", "")
        except redis.ResponseError:  # CONFIG disabled (managed Redis): snapshots are its operator's
            return False
        return bool(str(save).strip())

    def _wait_persisted(self, deadline: float, what: str, finished: Callable[[dict[str, Any]], bool]) -> None:
        while True:
            info = self._client.info("persistence")
            busy = int(info.get(f"{what}_in_progress", 0)) or int(info.get(f"{what}_scheduled", 0))
            if not busy and finished(info):
                return
            if time.monotonic() > deadline:
                raise redis.TimeoutError(
                    f"{what} still running after the erasure: erased keys may remain on disk"
                )
            time.sleep(0.01)

    def compact(self, before_day: int, ingested_before: float) -> Compacted:
        users = events = 0
        match = f"{self._prefix}ev:*"
        start = len(f"{self._prefix}ev:")
        for key in self._client.scan_iter(match=match, count=500):
            user_id = key.decode()[start:]
            folded = self._compact_user(user_id, before_day, ingested_before)
            if folded:
                users += 1
                events += folded
        return Compacted(users=users, events=events)

    def _compact_user(self, user_id: str, before_day: int, ingested_before: float) -> int:
        ev_key, fold_key = self._events_key(user_id), self._fold_key(user_id)
        for _ in range(_COMPACT_RETRIES):
            with self._client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(ev_key, fold_key)  # type: ignore[no-untyped-call]  # a concurrent write or erase makes EXEC fail: retry
                    raw: dict[bytes, bytes] = pipe.hgetall(ev_key)  # type: ignore[assignment]
                    rows = {k: _unpack(v) for k, v in raw.items()}
                    old = _due(rows, before_day, ingested_before)
                    if not old:
                        return 0
                    fold = _fold(list(old.values()))
                    previous = _folded(pipe.hgetall(fold_key))  # type: ignore[arg-type]
                    if previous is not None:
                        fold = previous.merge(fold)
                    pipe.multi()
                    pipe.hdel(ev_key, *old)
                    pipe.hset(
                        fold_key,
                        mapping={
                            "purchase_days": fold.purchase_days,
                            "first_day": fold.first_day,
                            "last_day": fold.last_day,
                            "amount": repr(fold.total_amount),
                            "quantity": repr(fold.total_quantity),
                        },
                    )
                    pipe.execute()
                    return len(old)
                except redis.WatchError:
                    continue
        return 0  # busy user: the next round folds it

    def record(self, predictions: Sequence[Prediction]) -> Appended:
        if not predictions:
            return Appended(0, 0)
        pipe = self._client.pipeline(transaction=True)
        keys = (self._due_key, self._recorded_key)
        for p in predictions:
            args = (_field(p), _value(p), _member(p), p.matures_at, repr(p.requested_at))
            self._record_script(keys=(self._predictions_key(p.user_id), *keys), args=args, client=pipe)
        stored = sum(int(r) for r in pipe.execute())
        return Appended(stored=stored, duplicates=len(predictions) - stored)

    def event_clock(self) -> int | None:
        score: float | None = self._client.zscore(self._clock_key, _CLOCK_MEMBER)
        return None if score is None else int(score)

    def _read(self, members: list[bytes]) -> list[Prediction]:
        """The predictions behind index ``members``; entries whose field is gone are dropped."""
        out: list[Prediction] = []
        for chunk in _chunks(members):
            pipe = self._client.pipeline(transaction=False)
            for member in chunk:
                user_id, day, version = json.loads(member)
                pipe.hget(self._predictions_key(user_id), json.dumps([day, version]))
            values: list[bytes | None] = pipe.execute()
            gone = [m for m, v in zip(chunk, values, strict=True) if v is None]
            if gone:
                self._drop(gone)
            out += [_prediction(m, v) for m, v in zip(chunk, values, strict=True) if v is not None]
        return out

    def _drop(self, members: list[bytes]) -> None:
        pipe = self._client.pipeline(transaction=True)
        for key in (self._due_key, self._settled_key, self._recorded_key):
            pipe.zrem(key, *members)
        pipe.execute()

    def due(self, matured_by: int, limit: int) -> list[Prediction]:
        members: list[bytes] = self._client.zrangebyscore(
            self._due_key, "-inf", matured_by, start=0, num=limit
        )  # type: ignore[assignment]
        return self._read(members)

    def settle(self, settled: Sequence[Prediction]) -> None:
        pipe = self._client.pipeline(transaction=True)
        keys = (self._due_key, self._settled_key, self._recorded_key)
        for p in settled:
            known = "1" if p.outcome is not None and p.outcome >= 0 else "0"
            args = (_field(p), _value(p), _member(p), p.matures_at, known)
            self._settle_script(keys=(self._predictions_key(p.user_id), *keys), args=args, client=pipe)
        pipe.execute()

    def settled(self, matured_after: int, matured_by: int) -> Settled:
        members: list[bytes] = self._client.zrangebyscore(self._settled_key, f"({matured_after}", matured_by)  # type: ignore[assignment]
        out = Settled({}, {})
        for p in self._read(members):
            if p.outcome is not None and p.outcome >= 0:
                out.probabilities.setdefault(p.model_version, []).append(p.probability)
                out.outcomes.setdefault(p.model_version, []).append(p.outcome)
        return out

    def backlog(self, overdue_by: int) -> Backlog:
        pipe = self._client.pipeline(transaction=True)
        pipe.zcard(self._due_key)
        pipe.zcount(self._due_key, "-inf", overdue_by)
        unsettled, overdue = pipe.execute()
        return Backlog(int(unsettled), int(overdue))

    def prune(self, settled_before: int, recorded_before: float) -> int:
        settled: list[bytes] = self._client.zrangebyscore(self._settled_key, "-inf", f"({settled_before}")  # type: ignore[assignment]
        old: list[bytes] = self._client.zrangebyscore(self._recorded_key, "-inf", f"({recorded_before!r}")  # type: ignore[assignment]
        members = list(dict.fromkeys(settled + old))
        for chunk in _chunks(members):
            pipe = self._client.pipeline(transaction=True)
            for member in chunk:
                user_id, day, version = json.loads(member)
                pipe.hdel(self._predictions_key(user_id), json.dumps([day, version]))
            for key in (self._due_key, self._settled_key, self._recorded_key):
                pipe.zrem(key, *chunk)
            pipe.execute()
        return len(members)

    def ping(self) -> None:
        self._client.ping()

    def close(self) -> None:
        self._client.close()
