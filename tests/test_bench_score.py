"""The scoring benchmark's own parts: the replicated logs, a run on a tiny model, the targets' verdicts.
No timing thresholds: numbers belong to bench runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bench import score as bench_score
from bench.floors import OrtFloor
from bench.machine import describe
from bench.replicas import replicate
from model_export.data import load_transactions
from tests.service.onnx_models import write_model

CDNOW_ROWS, CDNOW_USERS = 69_659, 23_570


def test_replicas_are_cdnow_copies_under_new_ids_and_shifted_dates(tmp_path: Path) -> None:
    path = tmp_path / "x3.parquet"
    replica = replicate(3, path)
    assert (replica.rows, replica.users) == (3 * CDNOW_ROWS, 3 * CDNOW_USERS)
    table = pq.read_table(path)
    assert table.num_rows == replica.rows
    assert str(table.schema.field("timestamp").type) == "timestamp[ms, tz=UTC]"  # Parquet has no seconds
    seconds = table.column("timestamp").cast(pa.timestamp("s", tz="UTC")).cast(pa.int64())
    stamps = seconds.to_numpy()
    assert (np.diff(stamps) >= 0).all(), "rows come in time order"
    users = table.column("user_id")
    assert pc.count_distinct(users).as_py() == replica.users
    cdnow = load_transactions("cdnow").frame
    for copy in range(3):
        mine = pc.starts_with(users, f"c{copy:02d}-")
        first = pc.min(pc.filter(seconds, mine)).as_py()
        shift = first - int(cdnow["timestamp"].min())
        assert shift % 86_400 == 0
        assert 0 <= shift // 86_400 <= 6
        if copy == 0:
            assert shift == 0, "1x is CDNOW itself"
    modified = path.stat().st_mtime_ns
    assert replicate(3, path) == replica
    assert path.stat().st_mtime_ns == modified, "a log already built is reused"


def test_a_run_scores_the_log_and_judges_the_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_model(tmp_path / "model.onnx")
    out = tmp_path / "run.json"
    argv = ["--model", str(model), "--scales", "1", "--floor-seconds", "0.2", "--workdir", str(tmp_path)]
    assert bench_score.main([*argv, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 1x | 23,570 | 69,659 | 1 |" in table
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert run["users"] == CDNOW_USERS
    assert 20 < run["peak_rss_mb"] < 4096, "the job's own peak, not the bench process's"
    assert list(data["targets_met"]) == ["1x users/s >= 0.5 x raw onnxruntime"]
    assert not list(tmp_path.glob("scores-*")), "each run's output is removed"


def _floor(users_per_s: float) -> OrtFloor:
    return OrtFloor(256, 10, 1.0, 10.0, users_per_s, 1.0, 2.0)


def _run(copies: int, users_per_s: float, rss: float) -> bench_score.ScaleRun:
    return bench_score.ScaleRun(copies, copies * 10, copies * 5, copies, 1.0, users_per_s, 2.0, rss)


def test_targets_use_the_faster_floor_and_the_smallest_run() -> None:
    bench = bench_score.ScoreBench(
        started_at="2026-01-01T00:00:00Z",
        machine=describe(),
        model="m.onnx",
        model_version="v",
        batch_users=256,
        chunk_rows=250_000,
        intra_op_threads=1,
        floor_before=_floor(100.0),
        floor_after=_floor(80.0),
        runs=[_run(1, 60.0, 200.0), _run(40, 49.0, 300.0)],
        load_average_after=(0.0, 0.0, 0.0),
    )
    assert bench.targets() == {
        "1x users/s >= 0.5 x raw onnxruntime": True,
        "40x users/s >= 0.5 x raw onnxruntime": False,
        "40x peak RSS <= 1.5 x 1x": True,
    }
    heavier = dataclasses.replace(bench, runs=[_run(1, 60.0, 200.0), _run(40, 60.0, 301.0)])
    assert heavier.targets()["40x peak RSS <= 1.5 x 1x"] is False
    assert "**missed**" in bench_score.markdown(bench)
