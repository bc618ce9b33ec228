"""The pure parts of ``make bench-peers``: rows, the answer check, ours ÷ best peer, the table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

OURS = "ours"
#: Ours again with two worker processes, beside the peers' multi-worker modes.
OURS_WORKERS = "ours, 2 workers"
#: Largest allowed difference between a peer's probability and ours for the same body.
TOLERANCE = 1e-6
#: The issue's target: ours at least this many times the best peer's req/s at every concurrency.
TARGET = 2.0


@dataclass(frozen=True)
class Row:
    server: str
    connections: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass(frozen=True)
class Best:
    """Ours ÷ the fastest peer at one connection count, and which peer that was."""

    ratio: float
    peer: str


class AnswerError(ValueError):
    """A peer's answer cannot be read, or differs from ours."""


def probability(answer: bytes) -> float:
    """The probability in ``answer``: our ``/predict`` shape, or a V2 response's first output."""
    try:
        parsed = json.loads(answer)
        if "probability" in parsed:
            return float(parsed["probability"])
        return float(parsed["outputs"][0]["data"][0])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise AnswerError(f"no probability in the answer {answer[:300]!r}") from exc


def check_answer(server: str, theirs: float, ours: float, tolerance: float = TOLERANCE) -> None:
    """Raise :class:`AnswerError` unless ``theirs`` is within ``tolerance`` of ``ours``."""
    if not abs(theirs - ours) <= tolerance:
        raise AnswerError(f"{server} answered {theirs!r}, ours {ours!r}: beyond {tolerance}")


def best_peers(rows: Sequence[Row], ours_name: str = OURS) -> dict[int, Best]:
    """Ours ÷ the fastest peer per connection count; a phase with errors is never the best peer."""
    ours = {r.connections: r.requests_per_s for r in rows if r.server == ours_name}
    best: dict[int, Row] = {}
    for r in rows:
        if r.server in (OURS, OURS_WORKERS) or r.errors or r.requests_per_s <= 0:
            continue
        if r.connections not in best or r.requests_per_s > best[r.connections].requests_per_s:
            best[r.connections] = r
    return {c: Best(ours[c] / best[c].requests_per_s, best[c].server) for c in sorted(ours) if c in best}


def verdict(best: dict[int, Best], target: float = TARGET) -> str:
    """One line against the target "ours >= target x the best peer at every concurrency"."""
    if not best:
        return "no verdict: no peer was measured"
    missed = [c for c, b in best.items() if b.ratio < target]
    if not missed:
        return f"met: ours >= {target:g} x the best peer at every concurrency"
    return "missed at " + ", ".join(f"{c} ({best[c].ratio:.2f} x)" for c in missed)


def markdown(rows: Sequence[Row]) -> str:
    """One table: a row per server (ours first), req/s, p50 and p99 per connection count, then ours ÷ best."""
    conns = sorted({r.connections for r in rows})
    servers = [s for s in (OURS, OURS_WORKERS) if any(r.server == s for r in rows)]
    servers += [s for s in dict.fromkeys(r.server for r in rows) if s not in (OURS, OURS_WORKERS)]
    by = {(r.server, r.connections): r for r in rows}
    head = ["server"]
    for c in conns:
        head += [f"{c} conn req/s", "p50 ms", "p99 ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for server in servers:
        cells = [server]
        for c in conns:
            r = by.get((server, c))
            if r is None:
                cells += ["", "", ""]
                continue
            flag = f" ({r.errors} errors!)" if r.errors else ""
            cells += [f"{r.requests_per_s:,.0f}{flag}", f"{r.p50_ms:.3g}", f"{r.p99_ms:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    for name in (OURS, OURS_WORKERS):
        if name not in servers:
            continue
        best = best_peers(rows, name)
        cells = [f"**{name} ÷ best peer**"]
        for c in conns:
            b = best.get(c)
            cells += [f"**{b.ratio:.2f} x** ({b.peer})" if b else "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
