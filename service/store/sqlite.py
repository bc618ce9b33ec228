"""The default backend: one SQLite file, WAL journal, ``synchronous=FULL``.

Durability: a write is acknowledged after ``COMMIT`` returns, and with ``synchronous=FULL`` in WAL
mode that commit has fsynced the WAL, so an acknowledged event survives a SIGKILL and a power
loss (``NORMAL`` would survive the first but may lose the last commits on the second). Writes go
through one connection under a lock (SQLite has one writer anyway); reads use a small pool of
connections, and WAL lets them run beside the writer without waiting.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

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
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    user_id TEXT NOT NULL,
    event_key TEXT NOT NULL,
    ts INTEGER NOT NULL,
    day INTEGER NOT NULL,
    amount REAL NOT NULL,
    quantity INTEGER NOT NULL,
    ingested_at REAL NOT NULL,
    PRIMARY KEY (user_id, event_key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_day ON events (day);
CREATE TABLE IF NOT EXISTS clock (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS predictions (
    user_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    day INTEGER NOT NULL,
    as_of INTEGER NOT NULL,
    horizon_days INTEGER NOT NULL,
    matures_at INTEGER NOT NULL,
    probability REAL NOT NULL,
    requested_at REAL NOT NULL,
    outcome INTEGER,
    PRIMARY KEY (user_id, model_version, day)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS predictions_due ON predictions (matures_at) WHERE outcome IS NULL;
CREATE INDEX IF NOT EXISTS predictions_settled ON predictions (matures_at) WHERE outcome IS NOT NULL;
CREATE INDEX IF NOT EXISTS predictions_recorded ON predictions (requested_at);
CREATE TABLE IF NOT EXISTS folded (
    user_id TEXT PRIMARY KEY,
    purchase_days INTEGER NOT NULL,
    first_day INTEGER NOT NULL,
    last_day INTEGER NOT NULL,
    amount REAL NOT NULL,
    quantity REAL NOT NULL
) WITHOUT ROWID;
"""
# A file from before the clock existed starts it from its newest event (found through the day index).
_CLOCK_FROM_EVENTS = """
INSERT INTO clock (name, value)
SELECT 'events', MAX(ts) FROM events WHERE day = (SELECT MAX(day) FROM events)
ON CONFLICT (name) DO NOTHING
"""
_ADVANCE_CLOCK = (
    "INSERT INTO clock (name, value) VALUES ('events', ?) "
    "ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)"
)
_PREDICTION_COLUMNS = "user_id, model_version, as_of, horizon_days, probability, requested_at, outcome"


def _known(p: Prediction) -> bool:
    return p.outcome is not None and p.outcome >= 0


# ?1..?7 are a Prediction's fields in order; the day and the horizon's end are derived from them.
_RECORD = (
    "INSERT INTO predictions (user_id, model_version, day, as_of, horizon_days, matures_at, probability, "
    "requested_at, outcome) VALUES (?1, ?2, ?3 / 86400, ?3, ?4, ?3 + ?4 * 86400, ?5, ?6, ?7) "
    "ON CONFLICT DO NOTHING"
)
# Compaction folds whole user-days (a day is due once every event of it is old enough), so a day
# never ends up half folded and half raw, and it folds by service.cleaning's rule: identical events
# (same second, amount, quantity; say, one purchase sent under two event ids) count once.
_DUE = (
    "day < :before_day AND (user_id, day) NOT IN (SELECT user_id, day FROM events "
    "WHERE day < :before_day AND ingested_at >= :ingested_before)"
)
# "WHERE true": without a WHERE, SQLite would read ON CONFLICT as a join constraint
# (nosec B608 here and below: the f-strings insert module constants or "?" marks, never values,
# which are always bound parameters)
_FOLD = (
    "INSERT INTO folded (user_id, purchase_days, first_day, last_day, amount, quantity)\n"  # nosec B608
    "SELECT user_id, COUNT(DISTINCT day), MIN(day), MAX(day), SUM(amount), SUM(quantity)\n"
    f"FROM (SELECT DISTINCT user_id, ts, day, amount, quantity FROM events WHERE {_DUE})\n"
    "WHERE true GROUP BY user_id\n"
    "ON CONFLICT (user_id) DO UPDATE SET\n"
    "    purchase_days = purchase_days + excluded.purchase_days,\n"
    "    first_day = MIN(first_day, excluded.first_day),\n"
    "    last_day = MAX(last_day, excluded.last_day),\n"
    "    amount = amount + excluded.amount,\n"
    "    quantity = quantity + excluded.quantity\n"
)


class SQLiteStore:
    backend = "sqlite"

    def __init__(self, path: Path, *, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._generation = 0  # bumped on close: pooled readers of an older generation are dropped

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are explicit (BEGIN ... COMMIT) below
        conn = sqlite3.connect(
            self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            # deleted rows overwritten with zeros, not left in free space (erasure); some builds
            # default to it, this makes it so everywhere
            conn.execute("PRAGMA secure_delete = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _writer_conn(self) -> sqlite3.Connection:
        if self._writer is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._connect()
            try:
                conn.executescript(_SCHEMA)
                if conn.execute("SELECT 1 FROM events LIMIT 1").fetchone() is not None:
                    conn.execute(_CLOCK_FROM_EVENTS)
            except BaseException:
                conn.close()
                raise
            self._writer = conn
        return self._writer

    def _drop_writer(self) -> None:
        # after an error the connection may be unusable (file gone, disk error): open a new one
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            conn = self._writer_conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    self._drop_writer()
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        generation = self._generation
        if self._writer is None:  # the schema exists before anyone reads
            with self._write_lock:
                self._writer_conn()
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
        conn.execute("BEGIN")  # one snapshot for every statement of the read
        try:
            yield conn
        finally:
            try:
                conn.execute("COMMIT")
                keep = generation == self._generation
            except sqlite3.Error:
                keep = False
            if keep:
                self._readers.put(conn)
            else:
                conn.close()

    def append(self, events: Sequence[NewEvent], now: float) -> Appended:
        rows = [
            (e.user_id, e.key, e.timestamp, e.timestamp // _SECONDS_PER_DAY, e.amount, e.quantity, now)
            for e in events
        ]
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO events (user_id, event_key, ts, day, amount, quantity, ingested_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rows,
            )
            stored = conn.total_changes - before
            if rows:
                conn.execute(_ADVANCE_CLOCK, (max(row[2] for row in rows),))
        return Appended(stored=stored, duplicates=len(rows) - stored)

    def histories(self, user_ids: Sequence[str]) -> dict[str, History]:
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        # sqlite3 caches a prepared statement per SQL text (128 per connection, a 2,000-id one about
        # half a MB): one per distinct count would fill it with large ones. Padding the list to a
        # power of two with a repeated id keeps it to a dozen shapes and the same answer.
        ids += ids[-1:] * ((1 << (len(ids) - 1).bit_length()) - len(ids))
        marks = ",".join("?" * len(ids))
        # one statement: raw events and folded counters from the same snapshot
        sql = (
            f"SELECT user_id, 0, ts, amount, quantity, 0, 0 FROM events WHERE user_id IN ({marks}) "  # nosec B608
            "UNION ALL SELECT user_id, 1, purchase_days, amount, quantity, first_day, last_day "
            f"FROM folded WHERE user_id IN ({marks})"
        )
        out: dict[str, History] = {}
        with self._read() as conn:
            rows = conn.execute(sql, ids + ids).fetchall()
        for user_id, kind, a, amount, quantity, first_day, last_day in rows:
            history = out.get(user_id)
            if history is None:
                history = out[user_id] = History([], [], [], None)
            if kind == 0:
                history.timestamps.append(a)
                history.amounts.append(amount)
                history.quantities.append(quantity)
            else:
                folded = Folded(a, first_day, last_day, amount, quantity)
                out[user_id] = History(history.timestamps, history.amounts, history.quantities, folded)
        return out

    def page(self, user_id: str, offset: int, limit: int) -> Page | None:
        with self._read() as conn:
            (total,) = conn.execute("SELECT COUNT(*) FROM events WHERE user_id = ?", (user_id,)).fetchone()
            folded_row = conn.execute(
                "SELECT purchase_days, first_day, last_day, amount, quantity FROM folded WHERE user_id = ?",
                (user_id,),
            ).fetchone()
            rows = conn.execute(
                "SELECT event_key, ts, amount, quantity, ingested_at FROM events WHERE user_id = ? "
                "ORDER BY ts, event_key LIMIT ? OFFSET ?",
                (user_id, limit, offset),
            ).fetchall()
        if total == 0 and folded_row is None:
            return None
        folded = Folded(*folded_row) if folded_row is not None else None
        return Page([StoredEvent(*row) for row in rows], int(total), folded)

    def erase(self, user_id: str) -> int:
        with self._write() as conn:
            deleted = conn.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
            conn.execute("DELETE FROM folded WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM predictions WHERE user_id = ?", (user_id,))
        self._checkpoint()
        return int(deleted)

    def _checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it: the erased rows' older page images
        live in the WAL until then. Waits for readers (busy_timeout); if one still holds an old
        snapshot, the erasure is reported as failed, so the caller retries rather than trusting it."""
        with self._write_lock:
            busy, _, _ = self._writer_conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError(
                "WAL checkpoint blocked by a reader: erased rows may remain in the WAL"
            )

    def compact(self, before_day: int, ingested_before: float) -> Compacted:
        params = {"before_day": before_day, "ingested_before": ingested_before}
        with self._write() as conn:
            users = conn.execute(_FOLD, params).rowcount
            events = conn.execute(f"DELETE FROM events WHERE {_DUE}", params).rowcount  # nosec B608
        return Compacted(users=int(users), events=int(events))

    def record(self, predictions: Sequence[Prediction]) -> Appended:
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(_RECORD, predictions)  # the named tuples bind as they are
            stored = conn.total_changes - before
        return Appended(stored=stored, duplicates=len(predictions) - stored)

    def event_clock(self) -> int | None:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM clock WHERE name = 'events'").fetchone()
        return None if row is None else int(row[0])

    def due(self, matured_by: int, limit: int) -> list[Prediction]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_PREDICTION_COLUMNS} FROM predictions WHERE outcome IS NULL AND matures_at <= ? "  # nosec B608
                "ORDER BY matures_at LIMIT ?",
                (matured_by, limit),
            ).fetchall()
        return [Prediction(*row) for row in rows]

    def settle(self, settled: Sequence[Prediction]) -> None:
        known = [(p.outcome, p.user_id, p.model_version, p.day) for p in settled if _known(p)]
        unknown = [(p.user_id, p.model_version, p.day) for p in settled if not _known(p)]
        with self._write() as conn:
            conn.executemany(
                "UPDATE predictions SET outcome = ? WHERE user_id = ? AND model_version = ? AND day = ?",
                known,
            )
            conn.executemany(
                "DELETE FROM predictions WHERE user_id = ? AND model_version = ? AND day = ?", unknown
            )

    def settled(self, matured_after: int, matured_by: int) -> Settled:
        out = Settled({}, {})
        with self._read() as conn:
            rows = conn.execute(
                "SELECT model_version, probability, outcome FROM predictions "
                "WHERE outcome IS NOT NULL AND matures_at > ? AND matures_at <= ?",
                (matured_after, matured_by),
            ).fetchall()
        for version, probability, outcome in rows:
            out.probabilities.setdefault(version, []).append(probability)
            out.outcomes.setdefault(version, []).append(outcome)
        return out

    def backlog(self, overdue_by: int) -> Backlog:
        with self._read() as conn:
            unsettled, overdue = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(matures_at <= ?), 0) FROM predictions WHERE outcome IS NULL",
                (overdue_by,),
            ).fetchone()
        return Backlog(int(unsettled), int(overdue))

    def prune(self, settled_before: int, recorded_before: float) -> int:
        with self._write() as conn:
            settled = conn.execute(
                "DELETE FROM predictions WHERE outcome IS NOT NULL AND matures_at < ?", (settled_before,)
            ).rowcount
            old = conn.execute("DELETE FROM predictions WHERE requested_at < ?", (recorded_before,)).rowcount
        return int(settled) + int(old)

    def ping(self) -> None:
        with self._write_lock:
            try:
                self._writer_conn().execute("SELECT 1 FROM folded LIMIT 1").fetchall()
            except sqlite3.Error:
                self._drop_writer()
                raise

    def close(self) -> None:
        with self._write_lock:
            self._generation += 1
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                return
