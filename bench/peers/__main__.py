"""``python -m bench.peers --model PATH``: our service next to every peer of bench/peers/lineup.py.

One run: our service (``python -m service``, this venv), then each peer from its own venv
(``bench/.venv-<peer>``), one server up at a time on a free loopback port. Each peer must answer
the probability ours answered for the same 20-event body before wrk loads it at every connection
count; a peer that is not installed, fails to start or disagrees is recorded and skipped. The table
goes to stdout, progress to stderr, JSON to ``bench/results/peers-<time>.json``. Every server it
started is stopped (with whatever it spawned) on success, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench import bodies, machine, processes, wrk
from bench.__main__ import parse_duration
from bench.peers.lineup import V2_BODY, Peer, lineup, v2_body
from bench.peers.table import (
    OURS,
    OURS_WORKERS,
    AnswerError,
    Row,
    best_peers,
    check_answer,
    markdown,
    probability,
    verdict,
)

REPO = Path(__file__).resolve().parents[2]
_RESULTS = REPO / "bench" / "results"

Say = Callable[[str], None]


class PeersError(RuntimeError):
    """The run cannot be a fair comparison (our own server failed)."""


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


def _probability(server: processes.Server, path: str, body: bytes) -> float:
    status, answer = processes.post(server.url + path, body)
    if status != 200:
        raise AnswerError(f"POST {path} answered {status}: {answer[:300]!r}")
    return probability(answer)


def _load(server: processes.Server, url: str, script: Path, args: argparse.Namespace, say: Say) -> list[Row]:
    if args.warmup > 0:
        say(f"{server.name}: warming up for {args.warmup} s")
        wrk.run(url, script=script, connections=max(args.connections), duration_s=args.warmup)
    rows = []
    for c in args.connections:
        say(f"{server.name}: {c} connection(s) for {args.duration} s")
        result = wrk.run(
            url, script=script, connections=c, duration_s=args.duration, timeout_s=max(10, args.duration)
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


def _measure_ours(
    args: argparse.Namespace, workdir: Path, say: Say, workers: int = 1
) -> tuple[float, list[Row]]:
    body_file = workdir / "predict.json"
    script = wrk.write_post_script(workdir / "predict.lua", body_file)
    port = processes.free_port()
    argv = [sys.executable, "-m", "service", "--model", str(args.model.resolve())]
    argv += ["--host", processes.HOST, "--port", str(port)]
    env = {"PI_STORE_PATH": str(workdir / f"events-{workers}.sqlite3"), "PI_WORKERS": str(workers)}
    name = OURS if workers == 1 else OURS_WORKERS
    servers: list[processes.Server] = []
    with _started(servers):
        server = processes.start(name, argv, port, workdir / f"ours-{workers}.log", cwd=REPO, env=env)
        servers.append(server)
        processes.wait_ready(server)
        ours = _probability(server, "/predict", body_file.read_bytes())
        say(f"ours answers {ours!r}")
        return ours, _load(server, server.url + "/predict", script, args, say)


def _measure_peer(
    peer: Peer, ours: float, args: argparse.Namespace, workdir: Path, say: Say
) -> tuple[float, list[Row]]:
    """Start ``peer``, check its answer against ``ours``, load it; raise on any failure."""
    venv = args.venvs / f".venv-{peer.venv}"
    if not (venv / ".stamp").is_file():  # the Makefile stamps a venv once every install step passed
        raise processes.StartError(f"{venv} is not installed (make bench-peers installs it)")
    launch = peer.launch(venv, args.model.resolve(), workdir)
    slug = "".join(ch if ch.isalnum() else "-" for ch in peer.name.lower())
    body = (workdir / "predict.json").read_bytes()
    if launch.body == V2_BODY:
        body = v2_body(body)
    body_file = workdir / f"{slug}.json"
    body_file.write_bytes(body)
    script = wrk.write_post_script(workdir / f"{slug}.lua", body_file)
    env = {"PI_PEER_MODEL": str(args.model.resolve()), "PYTHONPATH": str(REPO), **launch.env}
    servers: list[processes.Server] = []
    with _started(servers):
        server = processes.start(
            peer.name, launch.argv, launch.port, workdir / f"{slug}.log", cwd=REPO, env=env
        )
        servers.append(server)
        processes.wait_ready(server, launch.ready_path, timeout=args.start_timeout)
        theirs = _probability(server, launch.predict_path, body)
        check_answer(peer.name, theirs, ours)
        say(f"{peer.name} answers {theirs!r}")
        return theirs, _load(server, server.url + launch.predict_path, script, args, say)


def run(
    args: argparse.Namespace, workdir: Path, say: Say
) -> tuple[list[Row], dict[str, str], dict[str, object]]:
    """The rows, the peers not measured (name → why), and the JSON record."""
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    facts = machine.describe()
    (workdir / "predict.json").write_bytes(bodies.predict_body())
    try:
        ours, rows = _measure_ours(args, workdir, say)
        two, two_rows = _measure_ours(args, workdir, say, workers=2)
        check_answer(OURS_WORKERS, two, ours, tolerance=0.0)
        rows += two_rows
    except (AnswerError, processes.StartError, wrk.WrkError) as exc:
        raise PeersError(f"our service: {exc}") from exc
    answers = {OURS: ours}
    failures: dict[str, str] = {}
    for peer in lineup():
        if args.only and not any(word.lower() in peer.name.lower() for word in args.only):
            continue
        try:
            answers[peer.name], peer_rows = _measure_peer(peer, ours, args, workdir, say)
        except (AnswerError, processes.StartError, wrk.WrkError, OSError) as exc:
            failures[peer.name] = str(exc)
            say(f"{peer.name}: skipped: {exc}")
            continue
        rows += peer_rows
    best = best_peers(rows)
    return (
        rows,
        failures,
        {
            "started_at": started_at,
            "model": str(args.model),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "wrk": wrk.version(),
            "probabilities": answers,
            "failures": failures,
            "machine": asdict(facts),
            "load_average_after": machine.load_average(),
            "rows": [asdict(r) for r in rows],
            "ours_over_best_peer": {str(c): asdict(b) for c, b in best.items()},
            "ours_2_workers_over_best_peer": {
                str(c): asdict(b) for c, b in best_peers(rows, OURS_WORKERS).items()
            },
            "verdict": verdict(best),
        },
    )


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
    parser.add_argument("--model", type=Path, required=True, help="the model.onnx every server serves")
    parser.add_argument("--venvs", type=Path, default=REPO / "bench", help="where bench/.venv-<peer> live")
    parser.add_argument("--only", type=lambda t: t.split(","), help="peers whose name has one of these words")
    parser.add_argument(
        "--start-timeout", type=float, default=120, help="seconds a peer may take to be ready"
    )
    parser.add_argument("--duration", type=parse_duration, default=10, help="per phase (default 10s)")
    parser.add_argument("--warmup", type=parse_duration, default=2, help="per server (default 2s; 0 = none)")
    parser.add_argument("--connections", type=_connections, default=(1, 16, 64), help="default 1,16,64")
    parser.add_argument("--json", type=Path, help="default bench/results/peers-<time>.json")
    parser.add_argument("--workdir", type=Path, help="keep the body, Lua script and server logs here")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        _say(f"not found: {args.model} (run make bench-peers)")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as scratch:
        workdir = args.workdir if args.workdir is not None else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            rows, failures, result = run(args, workdir, _say)
        except KeyboardInterrupt:
            _say("interrupted; every server it started is stopped")
            return 130
        except PeersError as exc:
            _say(f"failed: {exc}")
            return 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json if args.json is not None else _RESULTS / f"peers-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(markdown(rows))
    for name, error in failures.items():
        sys.stdout.write(f"\n- {name}: not measured: {error.splitlines()[0]}")
    sys.stdout.write(f"\n\nverdict (ours >= 2 x the best peer at every concurrency): {result['verdict']}\n")
    _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
