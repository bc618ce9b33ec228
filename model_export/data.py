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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
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
    """A cleaned log: one row per user-day purchase, sorted by user then time.

    ``frame`` columns: user_id (str), timestamp (int64 epoch seconds, UTC), amount, quantity.
    """

    frame: pd.DataFrame
    report: CleaningReport
    fingerprint: str  # sha256 of the cleaned rows: identifies the training data in the model file

    @property
    def last_timestamp(self) -> int:
        return int(self.frame["timestamp"].max())


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
    """Read, validate and clean a log; ``source`` is a CSV/Parquet path or ``"cdnow"``."""
    if str(source) == CDNOW_NAME:
        path = cdnow_path()
        columns = CDNOW_COLUMNS
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"input file not found: {path}")
    frame, first_line = read_raw(path, columns or {})
    report = CleaningReport(source=str(source), rows_read=len(frame))

    user = frame["user_id"].str.strip()
    timestamp = parse_timestamps(frame["timestamp"], path, first_line)
    amount = parse_number(frame["amount"], "amount", path, first_line)
    quantity = parse_number(frame["quantity"], "quantity", path, first_line)

    df = pd.DataFrame({"user_id": user, "timestamp": timestamp, "amount": amount, "quantity": quantity})
    missing_value = (amount.isna() & frame["amount"].isna()) | (quantity.isna() & frame["quantity"].isna())
    drops = rows_to_drop(
        (user.isna() | (user == "")).to_numpy(np.bool_),
        timestamp.isna().to_numpy(np.bool_),
        missing_value.to_numpy(np.bool_),
        amount.to_numpy(np.float64),
        quantity.to_numpy(np.float64),
    )
    for rule, rows in drops.items():
        setattr(report, f"dropped_{rule}", int(rows.sum()))
    df = df[~np.logical_or.reduce(list(drops.values()))]

    # pandas may hold datetimes at s/ms/us/ns resolution: convert explicitly to epoch seconds
    df = df.assign(timestamp=df["timestamp"].dt.as_unit("s").astype("int64"))
    user_code = pd.factorize(df["user_id"])[0]
    repeated = exact_duplicates(
        user_code, df["timestamp"].to_numpy(), df["amount"].to_numpy(), df["quantity"].to_numpy()
    )
    report.dropped_exact_duplicates = int(repeated.sum())
    df = df[~repeated]

    day = df["timestamp"] // 86_400
    n_before = len(df)
    df = (
        df.assign(day=day)
        .groupby(["user_id", "day"], sort=True, as_index=False)
        .agg(timestamp=("timestamp", "min"), amount=("amount", "sum"), quantity=("quantity", "sum"))
        .drop(columns="day")
    )
    report.merged_same_day = n_before - len(df)
    df = df.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    df["user_id"] = df["user_id"].astype(str)
    if df.empty:
        raise DataError(f"{path}: no usable rows after cleaning ({report.to_dict()})")
    report.rows_kept = len(df)
    report.users = int(df["user_id"].nunique())
    report.first_timestamp = pd.Timestamp(int(df["timestamp"].min()), unit="s", tz="UTC").isoformat()
    report.last_timestamp = pd.Timestamp(int(df["timestamp"].max()), unit="s", tz="UTC").isoformat()
    return Transactions(frame=df, report=report, fingerprint=fingerprint(df))


def fingerprint(df: pd.DataFrame) -> str:
    digest = hashlib.sha256()
    digest.update(df["user_id"].to_numpy().astype(str).astype("U").tobytes())
    for col in ("timestamp", "amount", "quantity"):
        digest.update(np.ascontiguousarray(df[col].to_numpy()).tobytes())
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
