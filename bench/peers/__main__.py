"""``python -m bench.peers --model PATH --bentoml bench/.venv-peers/bin/bentoml``: us next to BentoML.

One run: our service (``python -m service``, this venv) and the BentoML service of
``bench/peers/bentoml_service.py`` (``bentoml serve`` from the peers venv) on free loopback ports;
both must answer the same probability for the same 20-event body, then each is loaded with wrk at
every connection count (ours first, then BentoML; the other one sits idle). The table goes to
stdout, progress to stderr, JSON to ``bench/results/peers-<time>.json``. Every server it started is
stopped (its whole process group) on success, failure, Ctrl-C or SIGTERM. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench import bodies, machine, processes, wrk
from bench.__main__ import parse_duration

REPO = Path(__file__).resolve().parents[2]
_RESULTS = REPO / "bench" / "results"
OURS = "ours"
BENTOML = "bentoml"
#: Largest allowed difference between the two servers' probabilities for the same body.
TOLERANCE = 1e-6

Say = Callable[[str], None]


class PeersError(RuntimeError):
    """The run cannot be a fair comparison (a server failed, or the answers differ)."""


@dataclass(frozen=True)
class Row:
    server: str
    connections: int
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def ratios(rows: Sequence[Row]) -> dict[int, float]:
    """Ours ÷ BentoML requests/s at each connection count both were measured at."""
    ours = {r.connections: r.requests_per_s for r in rows if r.server == OURS}
    peer = {r.connections: r.requests_per_s for r in rows if r.server == BENTOML}
    return {c: ours[c] / peer[c] for c in sorted(ours) if c in peer and peer[c] > 0}


def markdown(rows: Sequence[Row]) -> str:
    """One table: both servers side by side per connection count, and the throughput ratio."""
    by = {(r.server, r.connections): r for r in rows}
    ratio = ratios(rows)
    lines = [
        "| conns | ours req/s | ours p50 ms | ours p99 ms | BentoML req/s | BentoML p50 ms "
        "| BentoML p99 ms | ours / BentoML req/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in sorted({r.connections for r in rows}):
        cells = [str(c)]
        for server in (OURS, BENTOML):
            r = by.get((server, c))
            if r is None:
                cells += ["", "", ""]
                continue
            flag = f" ({r.errors} errors!)" if r.errors else ""
            cells += [f"{r.requests_per_s:,.0f}{flag}", f"{r.p50_ms:.3g}", f"{r.p99_ms:.3g}"]
        cells.append(f"{ratio[c]:.2f} x" if c in ratio else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, read from /proc (BentoML's workers get their own group)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(server: processes.Server) -> None:
    """SIGTERM, wait, SIGKILL; then whatever it started that is still alive (BentoML's workers)."""
    below = descendants(server.process.pid)
    server.stop()
    for pid in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _started(servers: list[processes.Server]) -> Iterator[None]:
    try:
        yield
    finally:
        for server in servers:
            _stop(server)


def _probability(server: processes.Server, body: bytes) -> float:
    status, answer = processes.post(server.url + "/predict", body)
    if status != 200:
        raise PeersError(f"{server.name}: POST /predict answered {status}: {answer[:300]!r}")
    return float(json.loads(answer)["probability"])


def _load(server: processes.Server, script: Path, args: argparse.Namespace, say: Say) -> list[Row]:
    if args.warmup > 0:
        say(f"{server.name}: warming up for {args.warmup} s")
        wrk.run(
            server.url + "/predict", script=script, connections=max(args.connections), duration_s=args.warmup
        )
    rows = []
    for c in args.connections:
        say(f"{server.name} /predict: {c} connection(s) for {args.duration} s")
        result = wrk.run(
            server.url + "/predict",
            script=script,
            connections=c,
            duration_s=args.duration,
            timeout_s=max(10, args.duration),
        )
        if result.errors:
            say(f"  {result.errors} errors ({result.socket_errors} socket, {result.non_2xx} non-2xx)")
        rows.append(
            Row(
                server.name,
                c,
                result.requests,
                result.requests_per_s,
                result.p50_ms,
                result.p99_ms,
                result.errors,
            )
        )
    return rows


def run(args: argparse.Namespace, workdir: Path, say: Say) -> tuple[list[Row], dict[str, object]]:
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    facts = machine.describe()
    body = bodies.predict_body()
    (workdir / "predict.json").write_bytes(body)
    script = wrk.write_post_script(workdir / "predict.lua", workdir / "predict.json")
    model = args.model.resolve()
    servers: list[processes.Server] = []
    with _started(servers):
        port = processes.free_port()
        ours = processes.start(
            OURS,
            [
                sys.executable,
                "-m",
                "service",
                "--model",
                str(model),
                *("--host", processes.HOST, "--port", str(port)),
            ],
            port,
            workdir / "ours.log",
            cwd=REPO,
            env={"PI_STORE_PATH": str(workdir / "events.sqlite3")},
        )
        servers.append(ours)
        port = processes.free_port()
        peer = processes.start(
            BENTOML,
            [
                str(args.bentoml),
                "serve",
                "bench.peers.bentoml_service:PurchaseIntent",
                *("--host", processes.HOST, "--port", str(port), "--working-dir", str(REPO)),
            ],
            port,
            workdir / "bentoml.log",
            cwd=REPO,
            env={
                "PI_PEER_MODEL": str(model),
                "BENTOML_HOME": str(workdir / "bentoml-home"),
                "BENTOML_DO_NOT_TRACK": "true",
            },
        )
        servers.append(peer)
        for server in servers:
            processes.wait_ready(server)
        answers = {s.name: _probability(s, body) for s in servers}
        say(f"probabilities for the same body: {answers}")
        if abs(answers[OURS] - answers[BENTOML]) > TOLERANCE:
            raise PeersError(f"the servers disagree beyond {TOLERANCE}: {answers}")
        rows = _load(ours, script, args, say)
        say("stopping ours")
        _stop(ours)
        rows += _load(peer, script, args, say)
    return rows, {
        "started_at": started_at,
        "model": str(args.model),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "wrk": wrk.version(),
        "probabilities": answers,
        "machine": asdict(facts),
        "load_average_after": machine.load_average(),
        "rows": [asdict(r) for r in rows],
        "ratios": {str(c): v for c, v in ratios(rows).items()},
    }


def _connections(text: str) -> tuple[int, ...]:
    values = tuple(int(p) for p in text.split(",") if p.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("connection counts must be >= 1")
    return values


def _say(message: str) -> None:
    print(f"bench.peers: {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the model.onnx both servers serve")
    parser.add_argument("--bentoml", type=Path, default=REPO / "bench/.venv-peers/bin/bentoml")
    parser.add_argument("--duration", type=parse_duration, default=10, help="per phase (default 10s)")
    parser.add_argument("--warmup", type=parse_duration, default=2, help="per server (default 2s; 0 = none)")
    parser.add_argument("--connections", type=_connections, default=(1, 16, 64), help="default 1,16,64")
    parser.add_argument("--json", type=Path, help="default bench/results/peers-<time>.json")
    parser.add_argument("--workdir", type=Path, help="keep the body, Lua script and server logs here")
    args = parser.parse_args(argv)
    if not args.model.is_file() or not args.bentoml.is_file():
        _say(f"not found: {args.model if not args.model.is_file() else args.bentoml} (run make bench-peers)")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as scratch:
        workdir = args.workdir if args.workdir is not None else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            rows, result = run(args, workdir, _say)
        except KeyboardInterrupt:
            _say("interrupted; every server it started is stopped")
            return 130
        except (PeersError, processes.StartError, wrk.WrkError) as exc:
            _say(f"failed: {exc}")
            return 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json if args.json is not None else _RESULTS / f"peers-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(markdown(rows))
    _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
