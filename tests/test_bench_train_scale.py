"""The training-at-scale benchmark's own parts: a real run at 1x, the targets' verdicts. No timing
thresholds: numbers belong to bench runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import train_scale
from bench.machine import describe

CDNOW_ROWS, CDNOW_USERS = 69_659, 23_570


def _run(copies: int, wall: float, rss: float, code: int = 0) -> train_scale.TrainRun:
    return train_scale.TrainRun(copies, copies * 10, copies * 30, code, wall, wall / 2, rss, "v")


def _bench(*runs: train_scale.TrainRun, today: float | None = 100.0) -> train_scale.TrainScaleBench:
    return train_scale.TrainScaleBench(
        started_at="2026-01-01T00:00:00Z",
        machine=describe(),
        seeds=1,
        epochs=2,
        today_wall_s=today,
        runs=list(runs),
        load_average_after=(0.0, 0.0, 0.0),
    )


def test_targets_judge_the_largest_scale_against_today() -> None:
    bench = _bench(_run(1, 10.0, 900.0), _run(40, 59.0, 4000.0))
    assert bench.targets() == {
        "40x peak RSS <= 4,096 MB": True,
        "40x wall <= 0.6 x today's 100 s (60 s)": True,
    }
    slow = _bench(_run(1, 10.0, 900.0), _run(40, 61.0, 4100.0))
    assert set(slow.targets().values()) == {False}
    assert "**missed**" in train_scale.markdown(slow)
    killed = _bench(_run(40, 30.0, 3000.0, code=-9))
    assert set(killed.targets().values()) == {False}, "a run that did not finish meets nothing"
    unjudged = _bench(_run(40, 30.0, 3000.0), today=None)
    assert list(unjudged.targets()) == ["40x peak RSS <= 4,096 MB"]
    assert "not judged" in train_scale.markdown(unjudged)


@pytest.mark.slow
def test_a_run_trains_on_the_log_and_reports_its_own_peak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.json"
    argv = ["--scales", "1", "--epochs", "1", "--workdir", str(tmp_path), "--today-wall-s", "1e6"]
    assert train_scale.main([*argv, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert f"| 1x | {CDNOW_USERS:,} | {CDNOW_ROWS:,} | 0 |" in table
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert run["model_version"].startswith("cln-out-of-time-")
    assert run["train_s"] > 0
    assert 100 < run["peak_rss_mb"] < 4096, "the training process's own peak, not the bench process's"
    assert data["targets_met"] == {
        "1x peak RSS <= 4,096 MB": True,
        "1x wall <= 0.6 x today's 1e+06 s (600000 s)": True,
    }
    assert not list(tmp_path.glob("train-x*")), "each run's output is removed"
