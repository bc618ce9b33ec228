"""Reading and cleaning a transaction log, and turning it into the encoder's columns.

A malformed file fails loudly, naming the column and the first bad line: we never train on garbage
silently. Rows training cannot use (an empty field, a non-finite or negative amount, a zero or
negative quantity) are dropped and counted in the report. Exact duplicates and same-day rows are
:mod:`service.cleaning`'s rule, which the encoder applies to any events, so the service scores a
raw log as training scores this cleaned one; every row training drops, the service refuses with a
422 (docs/model.md, "Data and cleaning", has the rules and the CDNOW counts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from service.cleaning import exact_duplicates
from service.columns import EventColumns

REQUIRED = ("user_id", "timestamp", "amount", "quantity")
CDNOW_NAME = "cdnow"
#: Our column names -> the CDNOW master file's.
CDNOW_COLUMNS = {
    "user_id": "customer_id",
    "timestamp": "date",
    "quantity": "number_of_cds",
    "amount": "dollar_value",
}


#: Why training drops a row, in the order the rules apply (``CleaningReport.dropped_<rule>``).
DROP_RULES = ("missing_user", "missing_timestamp", "missing_value", "bad_amount", "bad_quantity")


class DataError(ValueError):
    """The input log is malformed; the message names the column and the first bad line."""


@dataclass
class CleaningReport:
    source: str
    rows_read: int = 0
    dropped_missing_user: int = 0
    dropped_missing_timestamp: int = 0
    dropped_missing_value: int = 0
    dropped_bad_amount: int = 0
    dropped_bad_quantity: int = 0
    dropped_exact_duplicates: int = 0
    merged_same_day: int = 0
    rows_kept: int = 0
    users: int = 0
    first_timestamp: str = ""
    last_timestamp: str = ""

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


@dataclass(frozen=True)
class Transactions:
    """A cleaned log: one row per user-day purchase, held as columns grouped by user.

    User ``i`` of ``user_ids`` (sorted) owns rows ``[offsets[i], offsets[i + 1])`` of the event
    columns, in time order: 24 bytes a row and an id and an offset a user, no Python object per row.
    ``timestamps`` are int64 epoch seconds (UTC).
    """

    user_ids: NDArray[np.str_]
    offsets: NDArray[np.int64]  # [n_users + 1]
    timestamps: NDArray[np.int64]
    amounts: NDArray[np.float64]
    quantities: NDArray[np.float64]
    report: CleaningReport
    fingerprint: str  # sha256 of the cleaned rows: identifies the training data in the model file

    @property
    def n_users(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def first_timestamp(self) -> int:
        return int(self.timestamps.min())

    @property
    def last_timestamp(self) -> int:
        return int(self.timestamps.max())

    @property
    def frame(self) -> pd.DataFrame:
        """The rows as one pandas frame (user_id, timestamp, amount, quantity; ids as ``str``), built
        on each call: for a look at a small log, not for training."""
        return pd.DataFrame(
            {
                "user_id": np.repeat(self.user_ids, np.diff(self.offsets)).astype(object),
                "timestamp": self.timestamps,
                "amount": self.amounts,
                "quantity": self.quantities,
            }
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, report: CleaningReport, fingerprint: str) -> Transactions:
        """Cleaned rows (user_id, timestamp, amount, quantity) in any order, grouped by user, each
        user's rows in time order (a stable sort, so rows of one second keep theirs)."""
        ordered = frame.sort_values(["user_id", "timestamp"], kind="stable")
        ids, codes = np.unique(ordered["user_id"].to_numpy(dtype=str), return_inverse=True)
        return cls(
            user_ids=ids,
            offsets=_offsets(np.bincount(codes, minlength=ids.size)),
            timestamps=ordered["timestamp"].to_numpy(np.int64),
            amounts=ordered["amount"].to_numpy(np.float64),
            quantities=ordered["quantity"].to_numpy(np.float64),
            report=report,
            fingerprint=fingerprint,
        )

    def take(self, users: NDArray[np.int64]) -> Transactions:
        """These users (ascending indices) with their rows; the report and fingerprint stay the
        whole log's."""
        rows, offsets = user_rows(self.offsets, users)
        return replace(
            self,
            user_ids=self.user_ids[users],
            offsets=offsets,
            timestamps=self.timestamps[rows],
            amounts=self.amounts[rows],
            quantities=self.quantities[rows],
        )


def user_rows(
    offsets: NDArray[np.int64], users: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The rows of ``users`` (in the order given, each user's rows in order) and their offsets."""
    counts = offsets[users + 1] - offsets[users]
    out = _offsets(counts)
    rows = np.repeat(offsets[users] - out[:-1], counts) + np.arange(out[-1], dtype=np.int64)
    return rows, out


def _offsets(counts: NDArray[np.int64]) -> NDArray[np.int64]:
    out = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def cdnow_path() -> Path:
    """The CDNOW master file inside the installed ``lifetimes`` wheel.

    ``import lifetimes.datasets`` fails on current setuptools (it needs ``pkg_resources``), so the
    file is found relative to the package instead.
    """
    import lifetimes

    path = Path(lifetimes.__file__).parent / "datasets" / "CDNOW_master.txt"
    if not path.is_file():
        raise DataError(f"CDNOW data not found at {path}: is the 'lifetimes' package installed?")
    return path


def read_raw(path: Path, columns: dict[str, str]) -> tuple[pd.DataFrame, int]:
    """Returns the frame (all columns as strings) and the file line number of its first row."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path).astype("string")
        first_line = 1  # parquet has no lines; report row numbers from 1
    elif path.name == "CDNOW_master.txt":
        frame = pd.read_csv(path, sep=r"\s+", dtype=str, keep_default_na=False, na_values=[""])
        first_line = 2
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        first_line = 2
    frame.columns = [str(c).strip() for c in frame.columns]
    rename = {src: dst for dst, src in columns.items()}
    frame = frame.rename(columns=rename)
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        wanted = ", ".join(f"{c} (looked for {columns.get(c, c)!r})" for c in missing)
        raise DataError(f"{path}: missing required column(s) {wanted}; found {list(frame.columns)}")
    return frame[list(REQUIRED)].copy(), first_line


def parse_timestamps(raw: pd.Series, path: Path, first_line: int) -> pd.Series:
    text = raw.str.strip()
    if text.dropna().str.fullmatch(r"\d{8}").all():
        parsed = pd.to_datetime(text, format="%Y%m%d", errors="coerce", utc=True)
    else:
        parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna() & text.notna()
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}: column 'timestamp' has an unparseable value on line {pos + first_line}: "
            f"{str(text.iloc[pos])[:40]!r}"
        )
    return parsed


def parse_number(raw: pd.Series, column: str, path: Path, first_line: int) -> pd.Series:
    values = pd.to_numeric(raw.str.strip(), errors="coerce")
    # to_numeric accepts "nan"/"inf" spellings as floats; only truly non-numeric text is malformed
    bad = values.isna() & raw.notna() & ~raw.str.strip().str.lower().isin(["nan", "-nan", "+nan"])
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{path}: column {column!r} has a non-numeric value on line {pos + first_line}: "
            f"{str(raw.iloc[pos])[:40]!r}"
        )
    return values.astype("float64")


def rows_to_drop(
    missing_user: NDArray[np.bool_],
    missing_timestamp: NDArray[np.bool_],
    missing_value: NDArray[np.bool_],
    amount: NDArray[np.float64],
    quantity: NDArray[np.float64],
) -> dict[str, NDArray[np.bool_]]:
    """The rows training cannot use, by rule (``DROP_RULES``), each row under the first rule it
    breaks: an empty field, a non-finite or negative amount, a non-finite, zero or negative quantity.
    Training and the scoring job both drop by it."""
    with np.errstate(invalid="ignore"):
        broken = (
            missing_user,
            missing_timestamp,
            missing_value,
            ~(np.isfinite(amount) & (amount >= 0)),
            ~(np.isfinite(quantity) & (quantity > 0)),
        )
    seen = np.zeros(amount.shape, dtype=np.bool_)
    drops: dict[str, NDArray[np.bool_]] = {}
    for rule, rows in zip(DROP_RULES, broken, strict=True):
        drops[rule] = rows & ~seen
        seen |= rows
    return drops


def load_transactions(source: str | Path, columns: dict[str, str] | None = None) -> Transactions:
    """Read, validate and clean a log; ``source`` is a CSV/Parquet path or ``"cdnow"``.

    The log is read block by block with its own types (:mod:`model_export.reader`, the scoring
    job's reader: the same failures and drops); only the kept rows' typed columns are gathered.
    """
    # the reader is built on this module's parsers and rules, so it is imported here, not above
    from model_export.reader import open_log

    log = open_log(source, columns or {}, {}, required=REQUIRED)
    users: list[pa.Array] = []
    stamps: list[NDArray[np.int64]] = []
    amounts: list[NDArray[np.float64]] = []
    quantities: list[NDArray[np.float64]] = []
    for block in log.blocks():
        # the reader keeps a dropped row's user (the scoring job scores them); training drops it
        block = block.filter(block.column("timestamp").is_valid())
        users.append(block.column("user_id"))
        stamps.append(_numpy(block.column("timestamp"), np.int64))
        amounts.append(_numpy(block.column("amount"), np.float64))
        quantities.append(_numpy(block.column("quantity"), np.float64))
    c = log.counts
    report = CleaningReport(source=str(source), rows_read=c.rows_read)
    for rule, count in c.dropped.items():
        setattr(report, f"dropped_{rule}", count)
    if not c.rows_kept:
        raise DataError(f"{log.path}: no usable rows after cleaning ({report.to_dict()})")

    user_ids, user = _sorted_codes(pa.chunked_array(users, pa.string()).combine_chunks())
    ts, amt, qty = np.concatenate(stamps), np.concatenate(amounts), np.concatenate(quantities)
    del users, stamps, amounts, quantities
    repeated = exact_duplicates(user, ts, amt, qty)
    report.dropped_exact_duplicates = int(repeated.sum())
    kept = ~repeated
    rows = pd.DataFrame(
        {
            "user": user[kept],
            "day": ts[kept] // 86_400,
            "timestamp": ts[kept],
            "amount": amt[kept],
            "quantity": qty[kept],
        }
    )
    del user, ts, amt, qty, repeated, kept
    # codes follow the sorted ids, so this is the order of user id then day. pandas sums each group
    # in row (file) order with compensation: the sums are those a frame keyed by the ids gives.
    daily = rows.groupby(["user", "day"], sort=True).agg(
        timestamp=("timestamp", "min"), amount=("amount", "sum"), quantity=("quantity", "sum")
    )
    report.merged_same_day = len(rows) - len(daily)
    del rows
    # one row a user-day, days ascending: the minimum timestamps of a user ascend with them
    offsets = _offsets(np.bincount(daily.index.get_level_values("user"), minlength=user_ids.size))
    timestamps = daily["timestamp"].to_numpy(np.int64)
    amount = daily["amount"].to_numpy(np.float64)
    quantity = daily["quantity"].to_numpy(np.float64)
    report.rows_kept = int(timestamps.size)
    report.users = int(user_ids.size)
    report.first_timestamp = _iso(int(timestamps.min()))
    report.last_timestamp = _iso(int(timestamps.max()))
    digest = fingerprint(user_ids, offsets, timestamps, amount, quantity)
    return Transactions(user_ids, offsets, timestamps, amount, quantity, report, digest)


def _numpy(column: pa.Array, dtype: type[np.generic]) -> NDArray[Any]:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)


def _sorted_codes(users: pa.Array) -> tuple[NDArray[np.str_], NDArray[np.int64]]:
    """The distinct ids sorted (code point order, as Python sorts ``str``) and each row's index
    into them: hashed once by Arrow, and only the distinct ids sorted."""
    encoded = pc.dictionary_encode(users)
    order = np.asarray(pc.array_sort_indices(encoded.dictionary), dtype=np.int64)
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size, dtype=np.int64)
    ids = np.asarray(encoded.dictionary.take(pa.array(order)).to_numpy(zero_copy_only=False), dtype=str)
    return ids, rank[np.asarray(encoded.indices, dtype=np.int64)]


def _iso(seconds: int) -> str:
    return pd.Timestamp(seconds, unit="s", tz="UTC").isoformat()


#: Users per piece when hashing the ids row by row: bounds the repeated ids held at once.
_FINGERPRINT_USERS = 1 << 16


def fingerprint(
    user_ids: NDArray[np.str_],
    offsets: NDArray[np.int64],
    timestamps: NDArray[np.int64],
    amounts: NDArray[np.float64],
    quantities: NDArray[np.float64],
) -> str:
    """sha256 of the rows: each row's id (fixed-width UTF-32, as numpy lays out ``str`` arrays), then
    the timestamps, amounts and quantities as int64 / float64 bytes."""
    digest = hashlib.sha256()
    counts = np.diff(offsets)
    for start in range(0, user_ids.size, _FINGERPRINT_USERS):
        stop = start + _FINGERPRINT_USERS
        digest.update(np.repeat(user_ids[start:stop], counts[start:stop]).tobytes())
    for column in (timestamps, amounts, quantities):
        digest.update(np.ascontiguousarray(column).tobytes())
    return digest.hexdigest()


def columns_from_frame(
    df: pd.DataFrame, as_of: int, user_ids: Sequence[str] | NDArray[np.str_] | None = None
) -> EventColumns:
    """Group a cleaned frame by user in the order of ``user_ids`` (default: sorted unique ids),
    every user encoded at ``as_of`` (epoch seconds).

    Users without rows get an empty slice, so they encode as "no history".
    """
    ids = np.sort(df["user_id"].unique()).astype(str) if user_ids is None else np.asarray(user_ids, dtype=str)
    codes = pd.Categorical(df["user_id"], categories=ids).codes.astype(np.int64)
    keep = codes >= 0
    order = np.argsort(codes[keep], kind="stable")
    rows = np.flatnonzero(keep)[order]
    counts = np.bincount(codes[keep], minlength=len(ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return EventColumns(
        timestamps=df["timestamp"].to_numpy(np.int64)[rows],
        amounts=df["amount"].to_numpy(np.float64)[rows],
        quantities=df["quantity"].to_numpy(np.float64)[rows],
        offsets=offsets,
        as_of=np.full(len(ids), as_of, dtype=np.int64),
        user_ids=ids.tolist(),
    )


def end_of_day(date: str) -> int:
    """Epoch seconds of the last second of ``date`` (YYYY-MM-DD, UTC): a cutoff day is inclusive."""
    day = pd.Timestamp(date, tz="UTC").normalize()
    return int(day.timestamp()) + 86_400 - 1
