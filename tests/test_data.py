"""Reading and cleaning transaction logs: the policy's counts, and malformed files failing loudly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model_export.data import DataError, cdnow_path, columns_from_frame, end_of_day, load_transactions
from service.features import ALL_CHANNELS, FeatureSpec, encode_batch


def write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cdnow_loads_with_the_published_shape() -> None:
    tx = load_transactions("cdnow")
    assert tx.report.rows_read == 69_659
    assert tx.report.users == 23_570
    assert tx.report.first_timestamp.startswith("1997-01-01")
    assert tx.report.last_timestamp.startswith("1998-06-30")
    # one row per user-day after merging
    day = tx.frame["timestamp"] // 86_400
    assert not pd.DataFrame({"u": tx.frame["user_id"], "d": day}).duplicated().any()
    assert tx.report.rows_kept + tx.report.merged_same_day + tx.report.dropped_exact_duplicates == 69_659
    assert (tx.report.dropped_exact_duplicates, tx.report.merged_same_day) == (255, 1_813)


def test_cleaning_policy_counts(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "user_id,timestamp,amount,quantity\n"
        "a,2024-01-01T10:00:00Z,10,1\n"
        "a,2024-01-01T10:00:00Z,10,1\n"  # exact duplicate
        "a,2024-01-01T18:00:00Z,5,2\n"  # same day: merged
        ",2024-01-02,3,1\n"  # missing user
        "b,,3,1\n"  # missing timestamp
        "b,2024-01-03,-1,1\n"  # negative amount
        "b,2024-01-03,inf,1\n"  # non-finite amount
        "b,2024-01-04,4,0\n"  # zero quantity
        "b,2024-01-05,4,1\n",
    )
    tx = load_transactions(path)
    r = tx.report
    assert (r.rows_read, r.dropped_missing_user, r.dropped_missing_timestamp) == (9, 1, 1)
    assert (r.dropped_bad_amount, r.dropped_bad_quantity) == (2, 1)
    assert (r.dropped_exact_duplicates, r.merged_same_day, r.rows_kept, r.users) == (1, 1, 2, 2)
    a = tx.frame[tx.frame["user_id"] == "a"].iloc[0]
    assert (a["amount"], a["quantity"]) == (15.0, 3.0)
    assert a["timestamp"] == pd.Timestamp("2024-01-01T10:00:00Z").timestamp()


def test_a_raw_log_encodes_like_its_cleaned_rows(tmp_path: Path) -> None:
    """What the service gets is the raw log; what training encodes is this module's cleaned log.
    The encoder applies the same rule, so both give the same features."""
    rng = np.random.default_rng(5)
    n = 3000
    raw = pd.DataFrame(
        {
            "user_id": rng.choice([f"u{i}" for i in range(100)], n),
            # whole hours of 60 days: several rows a day, and exact duplicates
            "timestamp": 1_700_000_000 // 86_400 * 86_400 + rng.integers(0, 60 * 24, n) * 3600,
            "amount": rng.integers(0, 80, n) / 8,  # exact in binary: sums in any order agree
            "quantity": rng.integers(1, 3, n),
        }
    )
    raw = pd.concat([raw, raw.sample(300, random_state=1)]).sample(frac=1.0, random_state=2)
    path = tmp_path / "raw.csv"
    raw.assign(timestamp=pd.to_datetime(raw["timestamp"], unit="s", utc=True)).to_csv(path, index=False)
    tx = load_transactions(path)
    assert tx.report.dropped_exact_duplicates >= 300  # the copies, and any chance repeats
    assert tx.report.merged_same_day > 0
    spec = FeatureSpec(lookback_bins=9, bin_days=3, channels=ALL_CHANNELS)
    as_of = end_of_day("2023-12-31")
    cleaned = columns_from_frame(tx.frame, as_of)
    want = encode_batch(cleaned.timestamps, cleaned.amounts, cleaned.quantities, cleaned.offsets, as_of, spec)
    raw_cols = columns_from_frame(raw.astype({"amount": np.float64}), as_of, cleaned.user_ids)
    got = encode_batch(
        raw_cols.timestamps, raw_cols.amounts, raw_cols.quantities, raw_cols.offsets, as_of, spec
    )
    np.testing.assert_array_equal(got, want)


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "user_id,timestamp,amount\na,2024-01-01,1\n")
    with pytest.raises(DataError, match=r"missing required column.*quantity"):
        load_transactions(path)


def test_column_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "cust,when,value,n\nx,2024-03-01,2.5,1\n")
    tx = load_transactions(path, {"user_id": "cust", "timestamp": "when", "amount": "value", "quantity": "n"})
    assert tx.frame["user_id"].tolist() == ["x"]


def test_unparseable_date_names_column_and_first_bad_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "user_id,timestamp,amount,quantity\na,2024-01-01,1,1\nb,not-a-date,1,1\nc,also bad,1,1\n"
    )
    with pytest.raises(DataError, match=r"'timestamp'.*line 3"):
        load_transactions(path)


def test_non_numeric_amount_names_column_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "user_id,timestamp,amount,quantity\na,2024-01-01,1,1\na,2024-01-02,12$,1\n")
    with pytest.raises(DataError, match=r"'amount'.*line 3"):
        load_transactions(path)


def test_parquet_input(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "timestamp": ["2024-01-01", "2024-02-01"],
            "amount": [1.0, 2.0],
            "quantity": [1, 3],
        }
    )
    path = tmp_path / "log.parquet"
    frame.to_parquet(path)
    tx = load_transactions(path)
    assert tx.report.rows_kept == 2
    assert sorted(tx.frame["user_id"]) == ["u1", "u2"]


def test_typed_parquet_cleans_as_its_text(tmp_path: Path) -> None:
    """A Parquet log keeps its types (timestamps, floats, integers): the cleaned rows and the
    fingerprint are those of the same log written as text."""
    raw = pd.read_csv(cdnow_path(), sep=r"\s+", dtype=str).head(3000)
    frame = pd.DataFrame(
        {
            "user_id": raw["customer_id"],
            "timestamp": pd.to_datetime(raw["date"], format="%Y%m%d", utc=True),
            "amount": raw["dollar_value"].astype(np.float64),
            "quantity": raw["number_of_cds"].astype(np.int64),
        }
    )
    frame.to_parquet(tmp_path / "log.parquet")
    frame.to_csv(tmp_path / "log.csv", index=False)
    typed, text = load_transactions(tmp_path / "log.parquet"), load_transactions(tmp_path / "log.csv")
    assert typed.fingerprint == text.fingerprint
    pd.testing.assert_frame_equal(typed.frame, text.frame)
    assert typed.report.to_dict() | {"source": ""} == text.report.to_dict() | {"source": ""}


def test_a_bad_parquet_value_names_column_and_row(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    good = ["2024-01-01", "2024-01-02", "2024-01-03"]
    pd.DataFrame(
        {"user_id": ["a", "b", "c", "d"], "timestamp": [*good, "soon"], "amount": 1.0, "quantity": 1}
    ).to_parquet(path)
    with pytest.raises(DataError, match=r"'timestamp'.*line 4: 'soon'"):
        load_transactions(path)
    pd.DataFrame(
        {"user_id": ["a", "b", "c"], "timestamp": good, "amount": ["1", "2$", "3"], "quantity": 1}
    ).to_parquet(path)
    with pytest.raises(DataError, match=r"'amount'.*line 2"):
        load_transactions(path)


def test_empty_after_cleaning_fails(tmp_path: Path) -> None:
    path = write(tmp_path, "user_id,timestamp,amount,quantity\na,2024-01-01,-5,1\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_transactions(path)


def test_columns_from_frame_groups_by_user_in_requested_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "user_id,timestamp,amount,quantity\nb,2024-01-02,2,1\na,2024-01-01,1,1\nb,2024-01-05,3,1\n",
    )
    cols = columns_from_frame(
        load_transactions(path).frame, end_of_day("2024-12-31"), np.array(["b", "zz", "a"])
    )
    assert cols.offsets.tolist() == [0, 2, 2, 3]
    assert cols.amounts.tolist() == [2.0, 3.0, 1.0]


def test_end_of_day_is_inclusive() -> None:
    assert end_of_day("1997-09-30") == pd.Timestamp("1997-10-01T00:00:00Z").timestamp() - 1
