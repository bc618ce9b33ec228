"""``score_log``: one model scores every user of a transaction log at one ``as_of``, Parquet out.

Two passes, so memory follows the chunk size, not the log. Pass 1 streams the log
(:mod:`model_export.reader`: typed, checked, cleaned as training cleans) into spill files by a hash
of the user id; pass 2 scores one spill file at a time (:mod:`model_export.partition`, what another
engine maps over user-partitioned chunks: :mod:`model_export.ray_engine`, Spark) and appends its
rows to ``<out>.partial``, renamed to ``<out>`` once complete. Every check runs in pass 1, so bad
input fails before any output exists. How it works and its memory model: docs/scoring.md.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from numpy.typing import NDArray
from tqdm import tqdm

from model_export.data import DataError, end_of_day
from model_export.partition import AS_OF_TYPE, read_spill, score_partition
from model_export.reader import EVENTS, Log, RowCounts, open_log
from service.config import Settings
from service.predictor import OnnxPredictor, Predictor, load_predictor
from service.timestamps import check_range

log = logging.getLogger(__name__)

#: Rows per spill file, about: what pass 2 holds in memory at once (with its users' answers).
CHUNK_ROWS = 250_000
#: Users per onnxruntime call: the service's own default slice (``PI_INFERENCE_BATCH_USERS``).
BATCH_USERS: int = Settings.model_fields["inference_batch_users"].default


@dataclass(frozen=True)
class ScoreReport:
    """What a run did: the file it wrote, for whom, and what cleaning dropped on the way."""

    out: str
    source: str
    model_version: str
    as_of: str  # RFC 3339, UTC
    users: int
    users_without_history: int  # no usable event up to as_of: scored as a user without events
    rows_after_as_of: int  # kept rows the encoder ignores
    partitions: int
    seconds: float  # from opening the log to renaming the output
    counts: RowCounts
    columns_filled: tuple[str, ...]  # missing from the log, not read by the model (reader.FILLERS)
    engine: str = "local"  # "local" | "ray"
    workers: int = 1  # processes that scored: the local engine's one, or Ray's actors

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"users_per_s": self.users_per_s}


def parse_as_of(text: str) -> int:
    """``YYYY-MM-DD`` (the end of that UTC day, as training's cutoffs) or RFC 3339 with an offset
    -> epoch seconds (fractions dropped). Raises ``ValueError``."""
    text = text.strip()
    if len(text) == 10:
        return end_of_day(datetime.strptime(text, "%Y-%m-%d").date().isoformat())
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset: write e.g. {text}Z")
    return math.floor(check_range(moment).timestamp())


def rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def partition_of(users: pa.Array, k: int) -> NDArray[np.int64]:
    """Which of ``k`` partitions each user id belongs to: a hash of its UTF-8 bytes (FNV-style,
    then mixed), the same in every run and process, vectorised over the array's buffers."""
    if k == 1:
        return np.zeros(len(users), dtype=np.int64)
    users = users.cast(pa.string())
    offsets = np.frombuffer(users.buffers()[1], dtype=np.int32, count=len(users) + 1, offset=users.offset * 4)
    starts = offsets[:-1].astype(np.int64) - offsets[0]
    lengths = np.diff(offsets).astype(np.int64)
    data = np.frombuffer(users.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]].astype(np.uint64)
    if data.size == 0:
        return np.zeros(len(users), dtype=np.int64)
    position = np.arange(data.size, dtype=np.int64) - np.repeat(starts, lengths)
    powers = np.cumprod(np.full(int(lengths.max()), 1_099_511_628_211, dtype=np.uint64))  # wraps mod 2**64
    weighted = np.append(data * powers[position], np.uint64(0))  # a last index reduceat accepts
    hashes = np.add.reduceat(weighted, starts)
    hashes[lengths == 0] = 0  # reduceat gives an empty segment its next value, not 0
    hashes ^= hashes >> np.uint64(31)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(29)
    return (hashes % np.uint64(k)).astype(np.int64)


#: Descriptors kept free beside the spill files: the log being read, the output, onnxruntime,
#: logging, a Ray driver's sockets.
SPARE_FILES = 64


def ensure_open_files(k: int) -> None:
    """Make room for ``k`` spill files open at once: the soft descriptor limit raised towards the
    hard one if needed, else a :class:`DataError` naming the fix, before anything is written."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = k + SPARE_FILES
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard == resource.RLIM_INFINITY or need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise DataError(
        f"the log needs {k} spill files open at once but this process may open only {hard} files: "
        "raise --chunk-rows (fewer, larger spill files) or the hard limit (ulimit -Hn)"
    )


class Spill:
    """Rows hash-partitioned by user into ``k`` Arrow IPC files: each user's rows in one file, in
    the log's order."""

    def __init__(self, directory: Path, k: int) -> None:
        ensure_open_files(k)
        self.k = k
        self._paths = [directory / f"part-{i:05d}.arrow" for i in range(k)]
        self._sinks = [pa.OSFile(str(p), "wb") for p in self._paths]
        self._writers = [ipc.new_stream(s, EVENTS) for s in self._sinks]

    def write(self, batch: pa.RecordBatch) -> None:
        part = partition_of(batch.column("user_id"), self.k)
        order = np.argsort(part, kind="stable")
        counts = np.bincount(part, minlength=self.k)
        grouped = batch.take(pa.array(order))
        start = 0
        for i, count in enumerate(counts.tolist()):
            if count:
                self._writers[i].write_batch(grouped.slice(start, count))
            start += count

    @property
    def paths(self) -> list[Path]:
        return list(self._paths)

    def close(self) -> None:
        for writer, sink in zip(self._writers, self._sinks, strict=True):
            writer.close()
            sink.close()

    def tables(self) -> Iterator[pa.Table]:
        """Each partition in turn, its file removed once read."""
        for path in self._paths:
            table = read_spill(path)
            path.unlink()
            yield table


def output_schema(predictor: Predictor, as_of: int) -> pa.Schema:
    meta = predictor.metadata
    return pa.schema(
        [
            ("user_id", pa.string()),
            ("as_of", AS_OF_TYPE),
            ("probability", pa.float32()),
            ("will_purchase", pa.bool_()),
            ("model_version", pa.string()),
        ],
        metadata={
            "model_version": meta.model_version,
            "threshold": repr(meta.threshold),
            "horizon_days": str(meta.horizon_days),
            "as_of": rfc3339(as_of),
        },
    )


@contextmanager
def atomic_parquet(out: Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer on ``<out>.partial``, renamed to ``out`` if the block ends normally and
    removed if it raises; a killed run leaves only the ``.partial`` (whose footer is missing)."""
    partial = out.with_name(out.name + ".partial")
    writer = pq.ParquetWriter(str(partial), schema)
    try:
        yield writer
        writer.close()
        with partial.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def session_settings(*, batch_users: int = BATCH_USERS, threads: int | None = None) -> Settings:
    """The service's settings (``PI_*`` variables apply, as to the service) with ``batch_users`` as
    the largest batch and ``threads`` as onnxruntime's intra-op threads."""
    overrides: dict[str, Any] = {"inference_batch_users": batch_users, "max_batch_users": batch_users}
    if threads is not None:
        overrides["intra_op_threads"] = threads
    return Settings(**overrides)


def open_model(model: Path, *, batch_users: int = BATCH_USERS, threads: int | None = None) -> OnnxPredictor:
    """The service's own loading, checks and warm-up, with :func:`session_settings`."""
    return load_predictor(session_settings(batch_users=batch_users, threads=threads), model)


def score_log(
    predictor: Predictor,
    source: str | Path,
    out: Path,
    *,
    as_of: int | None = None,
    columns: Mapping[str, str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    batch_users: int = BATCH_USERS,
    spill_dir: Path | None = None,
    progress: bool = False,
) -> ScoreReport:
    """Score every user of ``source`` (a CSV/Parquet path or ``"cdnow"``) at ``as_of`` (default: the
    end of the UTC day of the log's last usable event) into the Parquet file ``out``.

    Raises :class:`DataError` before writing anything if the log lacks a column, holds a value that
    does not parse, cannot feed the model's channels, or has no user.
    """
    started = time.perf_counter()
    with spilled(
        predictor, source, out, columns=columns, chunk_rows=chunk_rows, spill_dir=spill_dir, progress=progress
    ) as (log_file, spill):
        as_of = as_of if as_of is not None else default_as_of(log_file)
        tally = _score_spill(spill, predictor, as_of, out, batch_users, progress)
    seconds = time.perf_counter() - started
    return report(predictor, source, log_file, spill, out, as_of, tally, seconds)


@contextmanager
def spilled(
    predictor: Predictor,
    source: str | Path,
    out: Path,
    *,
    columns: Mapping[str, str] | None,
    chunk_rows: int,
    spill_dir: Path | None,
    progress: bool,
    partitions_multiple_of: int = 1,
) -> Iterator[tuple[Log, Spill]]:
    """Pass 1 for either engine: ``source`` opened, checked against the model, read and cleaned
    into spill files beside ``out`` (or in ``spill_dir``), removed when the block ends. The number
    of spill files is rounded up to a multiple of ``partitions_multiple_of`` (an engine's workers)."""
    log_file = open_log(source, columns or {}, predictor.metadata.feature_spec.columns_read())
    out.parent.mkdir(parents=True, exist_ok=True)
    # next to the output by default: the disk meant for the results, not a /tmp that may be RAM
    directory = spill_dir or out.parent
    remove_stale_spills(directory, out)
    prefix = f"{_spill_prefix(out)}{socket.gethostname()}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=directory) as scratch:
        yield log_file, _spill(log_file, Path(scratch), chunk_rows, progress, partitions_multiple_of)


def _spill_prefix(out: Path) -> str:
    return f".{out.name}.spill-"


def remove_stale_spills(directory: Path, out: Path) -> None:
    """Spill directories for ``out`` left by a run of this host that was killed (SIGKILL, power
    loss) are removed: they can be as large as the log. A directory is stale when the process named
    in it is gone; another host's are left alone, as a shared ``--spill-dir`` may hold them live."""
    host = socket.gethostname()
    for path in directory.glob(f"{_spill_prefix(out)}*"):
        owner = path.name[len(_spill_prefix(out)) :].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or _alive(int(owner[1])):
            continue
        log.warning("removing %s, left by a run that did not finish (pid %s)", path, owner[1])
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def default_as_of(log_file: Log) -> int:
    """The end of the UTC day of the log's newest usable event (known once pass 1 has run)."""
    counts = log_file.counts
    if counts.last_timestamp is None:
        raise DataError(f"{log_file.path}: no usable rows to take as_of from ({counts.to_dict()})")
    return end_of_day(datetime.fromtimestamp(counts.last_timestamp, UTC).date().isoformat())


def report(
    predictor: Predictor,
    source: str | Path,
    log_file: Log,
    spill: Spill,
    out: Path,
    as_of: int,
    tally: Tally,
    seconds: float,
    *,
    engine: str = "local",
    workers: int = 1,
) -> ScoreReport:
    """What a run of either engine did, once the output is in place."""
    return ScoreReport(
        out=str(out),
        source=str(source),
        model_version=predictor.metadata.model_version,
        as_of=rfc3339(as_of),
        users=tally.users,
        users_without_history=tally.without_history,
        rows_after_as_of=tally.after_as_of,
        partitions=spill.k,
        seconds=seconds,
        counts=log_file.counts,
        columns_filled=log_file.filled,
        engine=engine,
        workers=workers,
    )


def _spill(log_file: Log, directory: Path, chunk_rows: int, progress: bool, multiple_of: int) -> Spill:
    """Pass 1: the whole log read, checked and cleaned into spill files of about ``chunk_rows`` rows."""
    spill: Spill | None = None
    with tqdm(desc="read", unit=" rows", unit_scale=True, disable=not progress, leave=False) as bar:
        try:
            for block in log_file.blocks():
                if spill is None:  # a CSV's size in rows is known from its first block on
                    bar.total = log_file.estimated_rows
                    k = max(1, math.ceil(log_file.estimated_rows / chunk_rows))
                    spill = Spill(directory, math.ceil(k / multiple_of) * multiple_of)
                spill.write(block)
                bar.update(log_file.counts.rows_read - bar.n)
        finally:
            if spill is not None:
                spill.close()
    counts = log_file.counts
    if spill is None or counts.rows_read == counts.dropped["missing_user"]:
        raise DataError(f"{log_file.path}: no rows with a user id ({counts.to_dict()})")
    return spill


@dataclass
class Tally:
    """Who was scored, counted over the spill files as they are scored."""

    users: int = 0
    without_history: int = 0
    after_as_of: int = 0

    def add(self, chunk: pa.Table, as_of: int) -> None:
        users = chunk.column("user_id")
        stamps = chunk.column("timestamp")
        n = pc.count_distinct(users).as_py()
        self.users += n
        self.without_history += n - pc.count_distinct(pc.filter(users, pc.less_equal(stamps, as_of))).as_py()
        self.after_as_of += pc.sum(pc.greater(stamps, as_of)).as_py() or 0


def _score_spill(
    spill: Spill, predictor: Predictor, as_of: int, out: Path, batch_users: int, progress: bool
) -> Tally:
    """Pass 2: each spill file scored and appended to ``out`` as one row group."""
    tally = Tally()
    with (
        tqdm(desc="score", unit=" users", unit_scale=True, disable=not progress) as bar,
        atomic_parquet(out, output_schema(predictor, as_of)) as writer,
    ):
        for chunk in spill.tables():
            scores = score_partition(chunk, predictor, as_of, batch_users=batch_users)
            writer.write_table(scores, max(scores.num_rows, 1))
            tally.add(chunk, as_of)
            bar.update(scores.num_rows)
    return tally
