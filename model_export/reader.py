"""A transaction log read block by block, typed and cleaned by training's rules (for training and scoring).

CSV goes through pyarrow's streaming reader and Parquet record batch by record batch, so memory
follows the block, not the file; the bundled CDNOW file (whitespace-separated, small) goes through
training's own reader. Arrow converts each block; a block it refuses goes through training's parsers
(:mod:`model_export.data`), which accept it as training would or fail naming the column and line.
A row training drops is counted and loses its event, but keeps its user: that user is still scored,
as the service scores a user sent without events.
"""

from __future__ import annotations

import csv
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from numpy.typing import NDArray

from model_export.data import (
    CDNOW_COLUMNS,
    CDNOW_NAME,
    DROP_RULES,
    REQUIRED,
    DataError,
    cdnow_path,
    parse_number,
    parse_timestamps,
    read_raw,
    rows_to_drop,
)

#: One cleaned row: ``timestamp`` is null where training drops the row (its user is still scored).
EVENTS = pa.schema(
    [
        ("user_id", pa.string()),
        ("timestamp", pa.int64()),  # epoch seconds, UTC
        ("amount", pa.float64()),
        ("quantity", pa.float64()),
    ]
)
#: A column the model does not read may be missing from the log; it then holds this value, which
#: passes cleaning (exact duplicates are then judged on the columns the log has).
FILLERS = {"amount": 0.0, "quantity": 1.0}

_CSV_BLOCK_BYTES = 1 << 20  # pyarrow's default; its reader reads ahead, so RSS grows with this
_BLOCK_ROWS = 1 << 16
_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass
class RowCounts:
    """What cleaning did: rows read, dropped by each of training's rules, kept."""

    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_RULES, 0))
    rows_kept: int = 0
    last_timestamp: int | None = None  # the newest kept event, epoch seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Log:
    """An opened log: its header checked against what the model reads, its rows not read yet."""

    path: Path
    kind: str  # "csv" | "parquet" | "cdnow"
    names: dict[str, str]  # our column name -> the file's, for the columns present
    filled: tuple[str, ...]  # columns the file lacks and the model does not read
    estimated_rows: int  # exact for Parquet and CDNOW; from the file size for CSV
    counts: RowCounts = field(default_factory=RowCounts)

    def blocks(self) -> Iterator[pa.RecordBatch]:
        """The cleaned rows (:data:`EVENTS`) in file order, one block at a time; :attr:`counts`
        grows as they are read. Raises :class:`DataError` at the first malformed value."""
        first_line = 1 if self.kind == "parquet" else 2
        for raw in self._raw_blocks():
            if self.kind == "csv" and first_line == 2:
                # pyarrow cuts a CSV into blocks of about _CSV_BLOCK_BYTES: the first one tells the rest
                size = self.path.stat().st_size
                self.estimated_rows = raw.num_rows * size // max(1, min(size, _CSV_BLOCK_BYTES))
            if raw.num_rows:
                yield self._clean(raw, first_line)
            first_line += raw.num_rows

    def _raw_blocks(self) -> Iterator[pa.RecordBatch]:
        wanted = list(self.names.values())
        if self.kind == "parquet":
            yield from pq.ParquetFile(self.path).iter_batches(batch_size=_BLOCK_ROWS, columns=wanted)
        elif self.kind == "cdnow":
            frame, _ = read_raw(self.path, CDNOW_COLUMNS)  # text columns under our names
            yield from pa.Table.from_pandas(frame, preserve_index=False).to_batches(_BLOCK_ROWS)
        else:
            # every column as text: a conversion error in pyarrow's reader would not say on which
            # line, so values are converted per block below, where the block's first line is known
            reader = pcsv.open_csv(
                self.path,
                read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                convert_options=pcsv.ConvertOptions(
                    column_types=dict.fromkeys(wanted, pa.string()),
                    include_columns=wanted,
                    null_values=[""],  # training's rule: only an empty field is missing
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=True,
                ),
            )
            yield from reader

    def _clean(self, raw: pa.RecordBatch, first_line: int) -> pa.RecordBatch:
        n = raw.num_rows
        column = {ours: raw.column(theirs) for ours, theirs in self.names.items()}
        user = pc.utf8_trim_whitespace(column["user_id"].cast(pa.string()))
        ts, ts_null = self._seconds(column["timestamp"], first_line)
        values: dict[str, NDArray[np.float64]] = {}
        missing_value = np.zeros(n, dtype=np.bool_)
        for name in ("amount", "quantity"):
            if name in column:
                values[name], null = self._number(column[name], name, first_line)
                missing_value |= null
            else:
                values[name] = np.full(n, FILLERS[name])
        amt, qty = values["amount"], values["quantity"]

        no_user = np.asarray(pc.fill_null(pc.equal(user, ""), True).to_numpy(zero_copy_only=False))
        drops = rows_to_drop(no_user, ts_null, missing_value, amt, qty)
        gone = np.logical_or.reduce(list(drops.values()))
        kept = ~gone
        c = self.counts
        c.rows_read += n
        for rule, mask in drops.items():
            c.dropped[rule] += int(mask.sum())
        c.rows_kept += int(kept.sum())
        if kept.any():
            newest = int(ts[kept].max())
            c.last_timestamp = newest if c.last_timestamp is None else max(c.last_timestamp, newest)

        rows = ~no_user  # a row without a user names nobody to score
        return pa.record_batch(
            [
                user.filter(pa.array(rows)),
                pa.array(ts[rows], mask=gone[rows]),
                pa.array(amt[rows]),
                pa.array(qty[rows]),
            ],
            schema=EVENTS,
        )

    def _seconds(self, array: pa.Array, first_line: int) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        """Epoch seconds (naive times read as UTC, fractions dropped as training drops them) and
        where the value is missing."""
        kind = array.type
        if pa.types.is_date(kind):
            array, kind = array.cast(pa.timestamp("s")), pa.timestamp("s")
        if pa.types.is_timestamp(kind):
            return _epoch_seconds(array), _nulls(array)
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(
                f"{self.path}: column 'timestamp' holds {kind}; expected timestamps, dates or text"
            )
        text = pc.utf8_trim(array.cast(pa.string()), " \t\r\n")
        null = _nulls(text)
        parsed = _arrow_timestamps(text)
        if parsed is None:  # a value Arrow does not read: training's parser decides, or names the line
            series = parse_timestamps(pd.Series(text.to_pandas(), dtype="string"), self.path, first_line)
            series = series.fillna(pd.Timestamp(0, tz="UTC"))  # where null: `null` says so
            return series.dt.as_unit("s").astype("int64").to_numpy(np.int64), null
        return _epoch_seconds(parsed), null

    def _number(
        self, array: pa.Array, name: str, first_line: int
    ) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        kind = array.type
        null = _nulls(array)
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
            numbers = array.cast(pa.float64())
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            try:
                numbers = pc.utf8_trim_whitespace(array.cast(pa.string())).cast(pa.float64())
            except pa.ArrowInvalid:  # training's parser decides, or names the line
                raw = pd.Series(array.to_pandas(), dtype="string")
                return parse_number(raw, name, self.path, first_line).to_numpy(np.float64), null
        else:
            raise DataError(f"{self.path}: column {name!r} holds {kind}; expected numbers")
        return np.asarray(numbers.fill_null(np.nan).to_numpy(zero_copy_only=False), np.float64), null


def _nulls(array: pa.Array) -> NDArray[np.bool_]:
    if not array.null_count:
        return np.zeros(len(array), dtype=np.bool_)
    return np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=np.bool_)


def _epoch_seconds(stamps: pa.Array) -> NDArray[np.int64]:
    """A timestamp array (UTC, or naive and read as UTC) -> epoch seconds, 0 where null; fractions
    floored, as pandas' ``as_unit("s")`` floors them in training."""
    raw = np.asarray(stamps.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), np.int64)
    unit = _UNITS[stamps.type.unit]
    return raw // unit if unit > 1 else raw


def _arrow_timestamps(text: pa.Array) -> pa.Array | None:
    """Timestamps by training's rules where Arrow's parsers give pandas' answer: ``YYYYMMDD`` when
    every value of the block is eight digits (training decides so for the whole file), else ISO 8601
    with an offset, or without one (read as UTC). None: pandas decides (mixed offsets, ISO forms
    Arrow lacks, a bad value)."""
    try:
        if pc.all(pc.match_substring_regex(text, r"^\d{8}$")).as_py() is not False:
            return pc.strptime(text, format="%Y%m%d", unit="s")
        try:
            return text.cast(pa.timestamp("ns", tz="UTC"))
        except pa.ArrowInvalid:
            return text.cast(pa.timestamp("ns"))
    except pa.ArrowInvalid:
        return None


def open_log(
    source: str | Path,
    columns: Mapping[str, str],
    reads: Mapping[str, Collection[str]],
    *,
    required: Collection[str] = ("user_id", "timestamp"),
) -> Log:
    """Open ``source`` (a CSV/Parquet path or ``"cdnow"``) and check its header.

    ``columns`` maps our names to the file's; ``reads`` is what the model reads besides timestamps
    (column -> the channels reading it, ``FeatureSpec.columns_read``). A missing ``required`` column
    (training needs all four), or a column the model reads, is a :class:`DataError` naming it.
    """
    if str(source) == CDNOW_NAME:
        path = cdnow_path()
        with path.open() as fh:
            rows = sum(1 for _ in fh) - 1
        return Log(path, "cdnow", {c: c for c in REQUIRED}, (), rows)  # read_raw renames to ours
    path = Path(source)
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        kind = "parquet"
        meta = pq.ParquetFile(path).metadata
        header, rows = [str(c) for c in meta.schema.to_arrow_schema().names], meta.num_rows
    else:
        kind = "csv"
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
        rows = 0  # Log.blocks() estimates it from the first block
    found = {name.strip(): name for name in header}
    names: dict[str, str] = {}
    missing: list[str] = []
    for ours in REQUIRED:
        theirs = columns.get(ours, ours)
        if theirs in found:
            names[ours] = found[theirs]
        elif ours in ("user_id", "timestamp", *required) or ours in reads:
            missing.append(ours)
    if missing:
        wanted = ", ".join(
            f"{c} (looked for {columns.get(c, c)!r}"
            + (f"; the model's channels {', '.join(reads[c])} read it)" if c in reads else ")")
            for c in missing
        )
        raise DataError(f"{path}: missing required column(s) {wanted}; found {list(found)}")
    filled = tuple(c for c in REQUIRED if c not in names)
    return Log(path, kind, names, filled, rows)
