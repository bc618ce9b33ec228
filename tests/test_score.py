"""The batch scoring job on small logs and a tiny synthetic model: the service's answers, training's
cleaning, bad input refused before any output, an interrupted run leaving no file."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.typing import NDArray

import model_export.partition as partition
import model_export.reader as reader
from model_export.__main__ import main
from model_export.data import DROP_RULES, DataError, load_transactions
from model_export.score import open_model, parse_as_of, partition_of, score_log
from service.features import FeatureSpec, encode_batch
from service.predictor import OnnxPredictor
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model

HEADER = "user_id,timestamp,amount,quantity\n"
# exact duplicates, several rows a day, rows out of time order, one lone user
LOG = HEADER + (
    "a,2024-03-01T10:00:00Z,10.5,1\n"
    "b,2024-02-20,3,2\n"
    "a,2024-03-01T10:00:00Z,10.5,1\n"
    "a,2024-03-01T18:30:00Z,4.25,2\n"
    "c,2024-01-05T00:00:00+02:00,99,1\n"
    "a,2024-02-10,7,1\n"
    "b,2024-03-02T23:59:59Z,1.1,3\n"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # threshold inside the range the synthetic graph gives, so both answers of will_purchase occur
    meta = make_metadata(threshold=0.45)
    return write_model(tmp_path_factory.mktemp("model") / "model.onnx", metadata=meta)


@pytest.fixture(scope="module")
def predictor(model: Path) -> OnnxPredictor:
    return open_model(model, batch_users=4)


def service_answers(
    predictor: OnnxPredictor, rows: pd.DataFrame, users: list[str], as_of: int
) -> NDArray[np.float32]:
    """What ``/predict/batch`` computes for ``users`` sent with their rows in log order, 1,000 a request."""
    out = []
    for start in range(0, len(users), 1000):
        part = users[start : start + 1000]
        ts, amt, qty, offsets = [], [], [], [0]
        for u in part:
            mine = rows[rows["user_id"] == u]
            ts += mine["timestamp"].tolist()
            amt += mine["amount"].tolist()
            qty += mine["quantity"].tolist()
            offsets.append(len(ts))
        features = encode_batch(
            np.array(ts, dtype=np.int64), amt, qty, offsets, as_of, predictor.metadata.feature_spec
        )
        out.append(predictor.predict(features))
    return np.concatenate(out)


def epoch(text: str) -> int:
    return int(pd.Timestamp(text).timestamp())


def test_every_user_scored_as_the_service_scores_them(tmp_path: Path, predictor: OnnxPredictor) -> None:
    out = tmp_path / "scores.parquet"
    report = score_log(predictor, write(tmp_path / "log.csv", LOG), out)
    table = pq.read_table(out)
    assert table.column_names == ["user_id", "as_of", "probability", "will_purchase", "model_version"]
    assert table.schema.field("probability").type == pa.float32()
    assert table.column("user_id").to_pylist() == ["a", "b", "c"]  # one partition: sorted by id
    # the default as_of: the end of the UTC day of the last event
    as_of = epoch("2024-03-02T23:59:59Z")
    assert report.as_of == "2024-03-02T23:59:59Z"
    assert {v.timestamp() for v in table.column("as_of").to_pylist()} == {as_of}
    rows = pd.DataFrame(
        {
            "user_id": ["a", "b", "a", "a", "c", "a", "b"],
            "timestamp": [
                epoch(t)
                for t in (
                    "2024-03-01T10:00:00Z",
                    "2024-02-20T00:00:00Z",
                    "2024-03-01T10:00:00Z",
                    "2024-03-01T18:30:00Z",
                    "2024-01-04T22:00:00Z",
                    "2024-02-10T00:00:00Z",
                    "2024-03-02T23:59:59Z",
                )
            ],
            "amount": [10.5, 3, 10.5, 4.25, 99, 7, 1.1],
            "quantity": [1, 2, 1, 2, 1, 1, 3],
        }
    )
    want = service_answers(predictor, rows, ["a", "b", "c"], as_of)
    got = table.column("probability").to_numpy()
    assert got.view(np.int32).tolist() == want.view(np.int32).tolist()  # bit for bit
    threshold = predictor.metadata.threshold
    assert table.column("will_purchase").to_pylist() == [float(p) >= threshold for p in want]
    assert len(set(table.column("will_purchase").to_pylist())) == 2
    meta = table.schema.metadata
    assert meta[b"model_version"].decode() == predictor.metadata.model_version
    assert float(meta[b"threshold"]) == threshold
    assert set(table.column("model_version").to_pylist()) == {predictor.metadata.model_version}
    assert (report.users, report.users_without_history, report.counts.rows_read) == (3, 0, 7)
    assert not list(tmp_path.glob(".scores.parquet*")), "spill files and .partial are gone"


def test_as_of_is_a_day_or_an_instant_with_an_offset() -> None:
    assert parse_as_of("1998-03-31") == epoch("1998-03-31T23:59:59Z")
    assert parse_as_of("1998-03-31T12:00:00Z") == epoch("1998-03-31T12:00:00Z")
    assert parse_as_of("1998-03-31T12:00:00.9+02:00") == epoch("1998-03-31T10:00:00Z")
    for bad in ("1998-03-31T12:00:00", "31/03/1998", "2100-01-01T00:00:00Z"):
        with pytest.raises(ValueError):  # noqa: PT011 - three different messages
            parse_as_of(bad)


def test_events_after_as_of_are_ignored_and_late_users_scored_without_history(
    tmp_path: Path, predictor: OnnxPredictor
) -> None:
    out = tmp_path / "s.parquet"
    report = score_log(
        predictor, write(tmp_path / "log.csv", LOG), out, as_of=parse_as_of("2024-02-25T00:00:00Z")
    )
    assert (report.users, report.rows_after_as_of) == (3, 4)
    assert pq.read_table(out).column("user_id").to_pylist() == ["a", "b", "c"]
    assert report.users_without_history == 0
    early = score_log(predictor, tmp_path / "log.csv", out, as_of=parse_as_of("2024-01-31"))
    assert (early.users, early.users_without_history) == (3, 2)  # only c had bought by then


def test_a_missing_column_is_named_and_nothing_is_written(tmp_path: Path, predictor: OnnxPredictor) -> None:
    log = write(tmp_path / "log.csv", "user_id,when,amount,quantity\na,2024-01-01,1,1\n")
    out = tmp_path / "s.parquet"
    with pytest.raises(DataError, match=r"missing required column\(s\) timestamp \(looked for 'timestamp'\)"):
        score_log(predictor, log, out)
    assert list(tmp_path.iterdir()) == [log]
    # a mapping finds it
    score_log(predictor, log, out, columns={"timestamp": "when"})
    assert pq.read_table(out).num_rows == 1


def test_a_model_the_log_cannot_feed_is_refused_naming_the_channel(tmp_path: Path) -> None:
    spec = FeatureSpec(lookback_bins=8, bin_days=7, channels=("purchases", "log_quantity", "active"))
    model = write_model(tmp_path / "q.onnx", metadata=make_metadata(spec))
    log = write(tmp_path / "log.csv", "user_id,timestamp,amount\na,2024-01-01,1\n")
    with pytest.raises(
        DataError, match=r"quantity \(looked for 'quantity'; the model's channels log_quantity"
    ):
        score_log(open_model(model), log, tmp_path / "s.parquet")
    assert not (tmp_path / "s.parquet").exists()
    # the fixture's model reads amounts, not quantities: the same log feeds it
    spends = open_model(write_model(tmp_path / "a.onnx", metadata=make_metadata()))
    report = score_log(spends, log, tmp_path / "s.parquet")
    assert (report.users, report.columns_filled) == (1, ("quantity",))


@pytest.mark.parametrize(
    ("bad", "column", "what"),
    [
        ("a,1998-02-30,1,1", "timestamp", "an unparseable value"),
        ("a,yesterday,1,1", "timestamp", "an unparseable value"),
        ("a,2024-01-01,ten,1", "amount", "a non-numeric value"),
        ("a,2024-01-01,1,one", "quantity", "a non-numeric value"),
    ],
)
def test_a_bad_value_names_column_and_line_before_any_output(
    tmp_path: Path,
    predictor: OnnxPredictor,
    monkeypatch: pytest.MonkeyPatch,
    bad: str,
    column: str,
    what: str,
) -> None:
    monkeypatch.setattr(reader, "_CSV_BLOCK_BYTES", 4096)  # the bad row lies many blocks in
    good = "".join(f"u{i},2024-01-{1 + i % 28:02d}T10:00:00Z,{i % 50}.5,{1 + i % 3}\n" for i in range(4000))
    log = write(tmp_path / "log.csv", HEADER + good + bad + "\n" + good)
    out = tmp_path / "s.parquet"
    with pytest.raises(DataError, match=rf"column '{column}' has {what} on line 4002: "):
        score_log(predictor, log, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_a_bad_parquet_value_names_its_row(tmp_path: Path, predictor: OnnxPredictor) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": ["a", "b"],
                "timestamp": ["2024-01-01", "never"],
                "amount": [1.0, 2],
                "quantity": [1, 1],
            }
        ),
        path,
    )
    with pytest.raises(DataError, match=r"column 'timestamp' has an unparseable value on line 2: 'never'"):
        score_log(predictor, path, tmp_path / "s.parquet")


def test_rows_training_drops_are_dropped_and_counted_their_users_kept(
    tmp_path: Path, predictor: OnnxPredictor
) -> None:
    log = write(
        tmp_path / "log.csv",
        HEADER + "a,2024-01-01T10:00:00Z,10,1\n"
        ",2024-01-02,3,1\n"  # missing user
        "b,,3,1\n"  # missing timestamp
        "b,2024-01-03,,1\n"  # missing amount
        "b,2024-01-03,-1,1\n"  # negative amount
        "b,2024-01-03,inf,1\n"  # non-finite amount
        "b,2024-01-04,4,0\n"  # zero quantity
        "c,2024-01-05,4,1\n",
    )
    report = score_log(predictor, log, tmp_path / "s.parquet")
    training = load_transactions(log).report
    assert report.counts.rows_read == training.rows_read
    assert report.counts.dropped == {rule: getattr(training, f"dropped_{rule}") for rule in DROP_RULES}
    assert list(report.counts.dropped.values()) == [1, 1, 1, 2, 1]
    assert report.counts.rows_kept == 2
    # b had only rows training drops: scored, as the service scores a user sent without events
    assert (report.users, report.users_without_history) == (3, 1)
    table = pq.read_table(tmp_path / "s.parquet").to_pydict()
    b = table["probability"][table["user_id"].index("b")]
    empty = encode_batch([], [], [], [0, 0], parse_as_of(report.as_of), predictor.metadata.feature_spec)
    assert np.float32(b) == predictor.predict(np.concatenate([empty, empty]))[0]


def test_timestamp_forms_and_file_formats_agree(tmp_path: Path, predictor: OnnxPredictor) -> None:
    """The same purchases as CSV dates, CSV instants with offsets, and Parquet timestamps with and
    without a zone, dates and text: one answer."""
    users = ["a", "a", "b", "c"]
    days = ["2024-01-01", "2024-01-09", "2024-01-03", "2024-01-10"]
    amount, quantity = [1.5, 2.0, 3.0, 4.0], [1, 2, 1, 1]
    as_of = parse_as_of("2024-01-20")

    def run(path: Path) -> list[float]:
        score_log(predictor, path, tmp_path / "s.parquet", as_of=as_of)
        probabilities: list[float] = pq.read_table(tmp_path / "s.parquet").column("probability").to_pylist()
        return probabilities

    def csv(name: str, stamps: list[str]) -> Path:
        body = "".join(
            f"{u},{t},{a},{q}\n" for u, t, a, q in zip(users, stamps, amount, quantity, strict=True)
        )
        return write(tmp_path / name, HEADER + body)

    want = run(csv("dates.csv", days))
    assert run(csv("compact.csv", [d.replace("-", "") for d in days])) == want
    assert run(csv("offsets.csv", [f"{d}T01:30:00+01:00" for d in days])) == want
    assert (
        run(csv("mixed.csv", [f"{d}T00:00:00Z" if i % 2 else f"{d} 00:00" for i, d in enumerate(days)]))
        == want
    )
    stamps = pd.to_datetime(days).as_unit("s")
    for column in (
        pa.array(stamps.tz_localize("UTC"), pa.timestamp("ms", tz="UTC")),
        pa.array(stamps, pa.timestamp("us")),
        pa.array(stamps.date, pa.date32()),
        pa.array(days),
    ):
        path = tmp_path / "log.parquet"
        pq.write_table(
            pa.table({"user_id": users, "timestamp": column, "amount": amount, "quantity": quantity}), path
        )
        assert run(path) == want, column.type


def test_chunk_size_does_not_change_the_answers(tmp_path: Path, predictor: OnnxPredictor) -> None:
    rng = np.random.default_rng(0)
    n = 3000
    users = rng.integers(0, 700, size=n)
    days = rng.integers(0, 200, size=n)
    dates = (pd.Timestamp("2023-06-01") + pd.to_timedelta(days, unit="D")).strftime("%Y-%m-%d")
    body = "".join(
        f"user-{u},{d},{rng.integers(1, 90)}.25,{rng.integers(1, 4)}\n"
        for u, d in zip(users, dates, strict=True)
    )
    log = write(tmp_path / "log.csv", HEADER + body)
    whole = score_log(predictor, log, tmp_path / "whole.parquet")
    split = score_log(predictor, log, tmp_path / "split.parquet", chunk_rows=200)
    assert (whole.partitions, split.partitions) == (1, math.ceil(n / 200))
    a = pq.read_table(tmp_path / "whole.parquet")
    b = pq.read_table(tmp_path / "split.parquet")
    assert a.num_rows == whole.users == split.users == len(set(users.tolist()))
    assert b.sort_by("user_id").equals(a)
    assert pq.ParquetFile(tmp_path / "split.parquet").metadata.num_row_groups == split.partitions


def test_an_interrupted_run_leaves_no_output_and_the_old_file_intact(
    tmp_path: Path, predictor: OnnxPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "".join(f"u{i},2024-01-{1 + i % 28:02d},{i}.5,1\n" for i in range(400))
    log = write(tmp_path / "log.csv", HEADER + body)
    out = tmp_path / "s.parquet"
    out.write_bytes(b"yesterday's scores")
    real = partition.score_frame
    calls = 0

    def failing(*args: object, **kwargs: object) -> pa.Table:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, mid-write
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(partition, "score_frame", failing)
    with pytest.raises(KeyboardInterrupt):
        score_log(predictor, log, out, chunk_rows=50)
    assert calls == 3
    assert out.read_bytes() == b"yesterday's scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "s.parquet"], "no .partial, no spill"


def test_partitions_depend_on_the_id_alone() -> None:
    ids = pa.array([f"user-{i}" for i in range(10_000)] + ["é", "x" * 300])
    parts = partition_of(ids, 7)
    assert (parts.min(), parts.max()) == (0, 6)
    assert np.bincount(parts).min() > 10_000 / 7 * 0.9  # spread evenly
    assert (partition_of(ids.slice(5000), 7) == parts[5000:]).all()  # a slice of a buffer
    assert (partition_of(pa.array(ids.to_pylist(), pa.large_string()), 7) == parts).all()
    assert (partition_of(ids, 1) == 0).all()


def test_cli_writes_the_file_and_a_report(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = write(tmp_path / "log.csv", LOG)
    out, summary = tmp_path / "s.parquet", tmp_path / "report.json"
    args = ["score", "--model", str(model), "--data", str(log), "--out", str(out), "--no-progress"]
    assert main([*args, "--as-of", "2024-03-05", "--report", str(summary)]) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads(summary.read_text())
    assert (report["users"], report["as_of"]) == (3, "2024-03-05T23:59:59Z")
    assert pq.read_table(out).num_rows == 3
    bad = write(tmp_path / "bad.csv", HEADER + "a,soon,1,1\n")
    assert main([*args[:4], str(bad), "--out", str(tmp_path / "t.parquet"), "--no-progress"]) == 2
    assert "column 'timestamp' has an unparseable value on line 2: 'soon'" in capsys.readouterr().err
    assert not (tmp_path / "t.parquet").exists()
    with pytest.raises(SystemExit):
        main([*args, "--as-of", "2024-03-05T10:00:00"])  # no offset
    assert "no UTC offset" in capsys.readouterr().err


def test_a_killed_runs_spill_files_are_removed_by_the_next_run(
    tmp_path: Path, predictor: OnnxPredictor
) -> None:
    log = write(tmp_path / "log.csv", LOG)
    host = socket.gethostname()
    child = [sys.executable, "-c", "import os; print(os.getpid())"]
    gone = subprocess.run(child, capture_output=True, text=True, check=True)
    dead = int(gone.stdout)  # a pid that existed and has exited
    stale = tmp_path / f".s.parquet.spill-{host}-{dead}-abc123"
    live = tmp_path / f".s.parquet.spill-{host}-{os.getpid()}-def456"  # a run still going
    elsewhere = tmp_path / f".s.parquet.spill-other-host-{dead}-ghi789"  # a shared --spill-dir
    other_output = tmp_path / f".t.parquet.spill-{host}-{dead}-jkl012"
    for path in (stale, live, elsewhere, other_output):
        path.mkdir()
        (path / "part-00000.arrow").write_bytes(b"rows")
    score_log(predictor, log, tmp_path / "s.parquet")
    assert not stale.exists()
    assert live.exists()
    assert elsewhere.exists()
    assert other_output.exists()


def test_more_spill_files_than_the_process_may_open_fails_before_any_output(
    tmp_path: Path, model: Path
) -> None:
    body = "".join(f"u{i},2024-01-{1 + i % 28:02d},{i}.5,1\n" for i in range(400))
    log = write(tmp_path / "log.csv", HEADER + body)
    out = tmp_path / "s.parquet"
    args = ["score", "--model", str(model), "--data", str(log), "--out", str(out), "--no-progress"]

    def cli(limit: int, chunk_rows: int) -> subprocess.CompletedProcess[str]:
        # a hard limit can only be lowered, so in a child process
        script = (
            "import resource, sys; from model_export.__main__ import main; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); sys.exit(main(sys.argv[1:]))"
        )
        return subprocess.run(
            [sys.executable, "-c", script, *args, "--chunk-rows", str(chunk_rows)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=120,
        )

    refused = cli(limit=300, chunk_rows=1)  # 400 spill files
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "needs 400 spill files open at once but this process may open only 300" in refused.stderr
    assert "--chunk-rows" in refused.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".s.parquet*"))
    fits = cli(limit=300, chunk_rows=2)  # 200 spill files and the spare ones fit
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert pq.read_table(out).num_rows == 400
