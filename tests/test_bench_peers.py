"""``make bench-peers`` without the peers: the table, ours ÷ best peer, the answer check, the
handler every peer wraps (against our real service), and a run where no peer is installed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from bench import bodies
from bench.peers import __main__ as peers_main
from bench.peers.__main__ import descendants
from bench.peers.lineup import lineup, v2_body
from bench.peers.model import PeerModel
from bench.peers.table import (
    OURS,
    OURS_WORKERS,
    AnswerError,
    Best,
    Row,
    best_peers,
    check_answer,
    markdown,
    probability,
    verdict,
)
from tests.service.onnx_models import write_model
from tests.service.processes import require_binary, running_service


def _row(server: str, connections: int, rps: float, errors: int = 0) -> Row:
    return Row(server, connections, int(rps * 10), rps, 0.5, 2.0, errors)


def test_ours_is_divided_by_the_fastest_peer_at_each_concurrency() -> None:
    rows = [
        _row(OURS, 1, 3000),
        _row(OURS, 16, 4000),
        _row("A", 1, 1000),
        _row("B", 1, 1500),
        _row("A", 16, 2500),
        _row("B", 16, 1000),
        _row("A", 64, 900),  # ours not measured at 64: no ratio
    ]
    assert best_peers(rows) == {1: Best(2.0, "B"), 16: Best(1.6, "A")}


def test_a_peer_phase_with_errors_is_never_the_best_peer() -> None:
    rows = [_row(OURS, 1, 3000), _row("fast-failing", 1, 9000, errors=5), _row("slow", 1, 1000)]
    assert best_peers(rows) == {1: Best(3.0, "slow")}


def test_the_verdict_names_every_concurrency_below_the_target() -> None:
    assert verdict({1: Best(2.5, "A"), 16: Best(2.0, "A")}).startswith("met")
    assert verdict({1: Best(2.5, "A"), 16: Best(1.5, "B"), 64: Best(1.99, "B")}) == (
        "missed at 16 (1.50 x), 64 (1.99 x)"
    )
    assert verdict({}).startswith("no verdict")


def test_markdown_has_ours_first_a_row_per_peer_and_the_ratio_row() -> None:
    rows = [_row("B", 1, 800, errors=3), _row(OURS, 1, 2000), _row("A", 1, 1000), _row(OURS, 16, 4000)]
    table = markdown(rows).splitlines()
    assert table[0] == ("| server | 1 conn req/s | p50 ms | p99 ms | 16 conn req/s | p50 ms | p99 ms |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| ours", "| B", "| A", "| **ours ÷ best peer**"]
    assert table[2] == "| ours | 2,000 | 0.5 | 2 | 4,000 | 0.5 | 2 |"
    assert table[3] == "| B | 800 (3 errors!) | 0.5 | 2 |  |  |  |"
    assert table[5] == "| **ours ÷ best peer** | **2.00 x** (A) |  |  |  |  |  |"


def test_probability_reads_our_answer_and_a_v2_answer() -> None:
    assert probability(b'{"user_id": "u", "probability": 0.25}') == 0.25
    v2 = {"outputs": [{"name": "probability", "datatype": "FP64", "shape": [1, 1], "data": [0.75]}]}
    assert probability(json.dumps(v2).encode()) == 0.75
    with pytest.raises(AnswerError, match="no probability"):
        probability(b'{"error": "boom"}')
    with pytest.raises(AnswerError):
        probability(b"<html>500</html>")


def test_check_answer_allows_the_tolerance_and_nothing_more() -> None:
    check_answer("peer", 0.5 + 1e-7, 0.5)
    with pytest.raises(AnswerError, match="peer answered"):
        check_answer("peer", 0.5 + 1e-5, 0.5)
    with pytest.raises(AnswerError):
        check_answer("peer", float("nan"), 0.5)


def test_a_v2_body_carries_our_body_unchanged() -> None:
    body = bodies.predict_body()
    request = json.loads(v2_body(body))
    (tensor,) = request["inputs"]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("body", "BYTES", [1, 1])
    assert tensor["data"][0].encode() == body


def test_every_peer_has_a_distinct_name_and_a_venv() -> None:
    peers = lineup()
    assert len({p.name for p in peers}) == len(peers)
    assert {p.venv for p in peers} == {"peers", "mlserver", "kserve", "pytriton", "litserve"}


def test_descendants_finds_a_child() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in descendants(os.getpid())
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_the_peers_handler_answers_what_our_service_answers(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model.onnx")
    users = [bodies.predict_body(seed=seed) for seed in (0, 1, 2)]
    handler = PeerModel(str(model))
    alone = [handler.predict_json(body) for body in users]
    together = handler.predict_many([json.loads(body) for body in users])
    assert together == alone
    assert len({a["probability"] for a in alone}) == 3  # the bodies differ, so must the answers
    with running_service(model, tmp_path / "service.log") as server:
        for body, answer in zip(users, alone, strict=True):
            ours = httpx.post(
                f"{server.url}/predict", content=body, headers={"content-type": "application/json"}
            )
            assert ours.status_code == 200
            for key, value in answer.items():  # every field a peer answers, as ours answers it
                if key == "probability":
                    check_answer("handler", value, ours.json()[key])
                else:
                    assert ours.json()[key] == value, key


@pytest.mark.slow
def test_a_run_with_no_peer_installed_measures_ours_and_says_why_each_peer_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_binary("wrk", package="wrk")
    model = write_model(tmp_path / "model.onnx")
    out = tmp_path / "peers.json"
    argv = ["--model", str(model), "--venvs", str(tmp_path / "none"), "--json", str(out)]
    code = peers_main.main([*argv, "--duration", "1", "--warmup", "0", "--connections", "1"])
    assert code == 0
    report = json.loads(out.read_text())
    assert [(r["server"], r["connections"]) for r in report["rows"]] == [(OURS, 1), (OURS_WORKERS, 1)]
    assert all(r["requests"] > 0 for r in report["rows"])
    assert all(r["errors"] == 0 for r in report["rows"])
    assert set(report["failures"]) == {p.name for p in lineup()}
    assert all("is not installed" in why for why in report["failures"].values())
    assert report["verdict"].startswith("no verdict")
    printed = capsys.readouterr().out
    assert printed.startswith("| server | 1 conn req/s |")
    assert "not measured" in printed


def test_ours_with_two_workers_gets_its_own_ratio_row_and_is_never_a_peer() -> None:
    rows = [
        Row(OURS, 64, 100, 1000.0, 1.0, 2.0, 0),
        Row(OURS_WORKERS, 64, 100, 1800.0, 1.0, 2.0, 0),
        Row("KServe, 2 workers", 64, 100, 900.0, 1.0, 2.0, 0),
    ]
    assert best_peers(rows)[64].peer == "KServe, 2 workers"
    assert best_peers(rows, OURS_WORKERS)[64].ratio == 2.0
    table = markdown(rows)
    assert "**ours ÷ best peer**" in table
    assert "**ours, 2 workers ÷ best peer**" in table
