"""The pure parts of ``python -m bench.peers`` (the run itself needs BentoML: ``make bench-peers``)."""

from __future__ import annotations

import os
import subprocess

from bench.peers.__main__ import BENTOML, OURS, Row, descendants, markdown, ratios


def _row(server: str, connections: int, rps: float, errors: int = 0) -> Row:
    return Row(server, connections, int(rps * 10), rps, 0.5, 2.0, errors)


def test_ratios_are_ours_over_bentoml_where_both_ran() -> None:
    rows = [_row(OURS, 1, 2000), _row(BENTOML, 1, 1000), _row(OURS, 16, 4000)]
    assert ratios(rows) == {1: 2.0}


def test_markdown_one_line_per_connection_count_with_errors_flagged() -> None:
    rows = [_row(OURS, 1, 2000), _row(BENTOML, 1, 800, errors=3)]
    table = markdown(rows).splitlines()
    assert len(table) == 3
    assert table[2] == "| 1 | 2,000 | 0.5 | 2 | 800 (3 errors!) | 0.5 | 2 | 2.50 x |"


def test_descendants_finds_a_child() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in descendants(os.getpid())
    finally:
        child.kill()
        child.wait()
