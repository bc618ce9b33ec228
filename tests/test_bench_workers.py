"""``bench.workers`` end to end on a tiny model, one short round: it starts the constant floor and
the service at one and two workers, checks their answers, measures and writes its JSON. Speed is
the bench's to judge, not this test's: here, that every phase ran without errors, that the CPU it
reports was seen, and that both workers' memory was read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import workers
from tests.service.onnx_models import write_model
from tests.service.processes import require_binary

pytestmark = pytest.mark.slow


def test_the_workers_bench_runs_and_reports(tmp_path: Path) -> None:
    require_binary("wrk", package="wrk")
    model = write_model(tmp_path / "model.onnx")
    out = tmp_path / "workers.json"
    argv = [
        "--model",
        str(model),
        "--duration",
        "1",
        "--rounds",
        "1",
        "--connections",
        "1,8",
        "--json",
        str(out),
    ]
    workers.main(argv)
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert [(p["server"], p["connections"]) for p in phases] == [
        (server, c) for server in ("constant", "workers-1", "workers-2") for c in (1, 8)
    ]
    assert all(p["requests_per_s"] > 0 and p["errors"] == 0 for p in phases)
    assert all(p["service_cpus"] > 0 for p in phases)  # the server's own CPU time was read
    assert len(report["worker_peak_rss_mb"]) == 2
    assert all(50 < mb < 1000 for mb in report["worker_peak_rss_mb"])
    assert report["scaling"] > 0
    assert set(report["met"]) == {"scaling", "p99", "rss"}
    assert report["machine"]["usable_cpus"] >= 1
