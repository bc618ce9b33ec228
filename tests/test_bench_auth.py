"""``bench.auth`` end to end on a tiny model, one short round: it starts its servers, measures both
comparisons and writes its JSON. Speed is the bench's to judge, not this test's: here, only that
the limit held and the trickle token was never refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import auth
from tests.service.onnx_models import write_model
from tests.service.processes import require_binary

pytestmark = pytest.mark.slow


def test_the_auth_bench_runs_and_reports(tmp_path: Path) -> None:
    require_binary("wrk", package="wrk")
    model = write_model(tmp_path / "model.onnx")
    out = tmp_path / "auth.json"
    auth.main(["--model", str(model), "--duration", "2", "--rounds", "1", "--rate", "50", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [p["server"] for p in report["phases"]] == ["tokens-on", "tokens-off"]
    assert all(p["requests_per_s"] > 0 and p["errors"] == 0 for p in report["phases"])
    rate = report["rate"]
    assert rate["sent"] > rate["accepted"] > 0  # wrk far outruns 50 a second: most were refused
    assert rate["accepted"] <= 50 * (2 + 1) + 5  # two seconds of the rate, the burst, a margin
    assert rate["retry_after_seen"]
    assert rate["trickle_sent"] > 0
    assert rate["trickle_refused"] == 0
