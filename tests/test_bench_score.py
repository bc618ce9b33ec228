"""The scoring benchmark's own parts: the replicated logs, a run on a tiny model, the targets' verdicts.
No timing thresholds: numbers belong to bench runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

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


def _bench_1x(tmp_path: Path, capsys: pytest.CaptureFixture[str], engines: str) -> tuple[str, dict[str, Any]]:
    """``python -m bench.score`` at 1x on a tiny model: its table and its JSON."""
    model = write_model(tmp_path / "model.onnx")
    out = tmp_path / "run.json"
    argv = ["--model", str(model), "--scales", "1", "--floor-seconds", "0.2", "--workdir", str(tmp_path)]
    assert bench_score.main([*argv, "--engines", engines, "--json", str(out)]) == 0
    assert not list(tmp_path.glob("scores-*")), "each run's output is removed"
    data: dict[str, Any] = json.loads(out.read_text())
    return capsys.readouterr().out, data


def test_a_run_scores_the_log_and_judges_the_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table, data = _bench_1x(tmp_path, capsys, "local")
    assert "| 1x | local | 23,570 | 69,659 | 1 | 1 |" in table
    (run,) = data["runs"]
    assert run["users"] == CDNOW_USERS
    assert 20 < run["peak_rss_mb"] < 4096, "the job's own peak, not the bench process's"
    assert run["processes"] == 1
    assert 20 < run["tree_pss_mb"] <= run["tree_rss_mb"] < 4096
    assert list(data["targets_met"]) == ["1x users/s >= 0.5 x raw onnxruntime"]


@pytest.mark.slow  # a local Ray, started by the job
def test_a_run_of_both_engines_compares_their_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table, data = _bench_1x(tmp_path, capsys, "ray,local")
    assert "| 1x | local | 23,570 | 69,659 | 1 | 1 |" in table
    assert "| 1x | ray | 23,570 | 69,659 | " in table
    local, ours = data["runs"]
    assert (local["engine"], ours["engine"]) == ("local", "ray")
    assert ours["same_as_local"] is True
    assert ours["workers"] >= 1
    assert ours["processes"] > 3, "the raylet, GCS and workers are counted"
    assert ours["tree_pss_mb"] > ours["peak_rss_mb"]
    assert data["targets_met"]["1x Ray output identical to the local engine's"] is True
    assert "1x Ray users/s >= 0.6 x the local engine's" in data["targets_met"]


def _floor(users_per_s: float) -> OrtFloor:
    return OrtFloor(256, 10, 1.0, 10.0, users_per_s, 1.0, 2.0)


def _run(copies: int, users_per_s: float, rss: float) -> bench_score.ScaleRun:
    return bench_score.ScaleRun(copies, copies * 10, copies * 5, copies, 1.0, users_per_s, 2.0, rss)


def _bench(runs: list[bench_score.ScaleRun], *, floor_after: float = 100.0) -> bench_score.ScoreBench:
    return bench_score.ScoreBench(
        started_at="2026-01-01T00:00:00Z",
        machine=describe(),
        model="m.onnx",
        model_version="v",
        batch_users=256,
        chunk_rows=250_000,
        intra_op_threads=1,
        floor_before=_floor(100.0),
        floor_after=_floor(floor_after),
        runs=runs,
        load_average_after=(0.0, 0.0, 0.0),
    )


def test_targets_use_the_faster_floor_and_the_smallest_run() -> None:
    bench = _bench([_run(1, 60.0, 200.0), _run(40, 49.0, 300.0)], floor_after=80.0)
    assert bench.targets() == {
        "1x users/s >= 0.5 x raw onnxruntime": True,
        "40x users/s >= 0.5 x raw onnxruntime": False,
        "40x peak RSS <= 1.5 x 1x": True,
    }
    heavier = dataclasses.replace(bench, runs=[_run(1, 60.0, 200.0), _run(40, 60.0, 301.0)])
    assert heavier.targets()["40x peak RSS <= 1.5 x 1x"] is False
    assert "**missed**" in bench_score.markdown(bench)


def test_the_ray_engine_is_judged_against_the_local_engine_on_the_same_log() -> None:
    local = _run(10, 100.0, 200.0)
    fast = dataclasses.replace(local, engine="ray", users_per_s=60.0, same_as_local=True)
    bench = _bench([local, fast])
    assert bench.targets() == {
        "10x users/s >= 0.5 x raw onnxruntime": True,
        "10x Ray output identical to the local engine's": True,
        "10x Ray users/s >= 0.6 x the local engine's": True,
    }
    slow = dataclasses.replace(fast, users_per_s=59.0, same_as_local=False)
    verdicts = dataclasses.replace(bench, runs=[local, slow]).targets()
    assert verdicts["10x Ray output identical to the local engine's"] is False
    assert verdicts["10x Ray users/s >= 0.6 x the local engine's"] is False
    assert "| 10x | ray |" in bench_score.markdown(bench)
