"""``python -m bench.workers --model PATH``: what a second worker process buys (``make bench-workers``;
bench/README.md, "Worker processes").

``/predict`` (one user, 20 events, the bench's usual body) from fresh servers in alternating
rounds, so a machine that gets busier during the run weighs on all alike: the constant FastAPI
floor (one process), the service with ``PI_WORKERS=1`` and with ``PI_WORKERS=2``, each at every
connection count. Both services must give the same answer bytes before any timing. After the
two-worker runs each worker's peak resident memory is read from ``/proc``. Each run also records
the CPU the server's processes used and the CPU left idle on the machine: wrk runs on the same
cores, so a server can only scale into what wrk and everything else leave over.

Targets at 64 connections: two workers ≥ 1.7 x one worker's requests a second (summed over the
rounds), two workers' p99 ≤ 2 x the constant floor's p99 (mean over the rounds), and every
worker's peak RSS ≤ 300 MB.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import bodies, machine, processes, wrk
from bench.harness import REPO

TARGET_SCALING = 1.7
TARGET_P99_FACTOR = 2.0
TARGET_RSS_MB = 300.0
SERVERS = ("constant", "workers-1", "workers-2")


@dataclass(frozen=True)
class Phase:
    server: str
    round: int
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    service_cpus: float  # CPU seconds the server's processes used per second of the run
    idle_cpus: float  # of the machine's CPUs, how many were idle on average during the run


def _post(url: str, body: bytes) -> bytes:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    # http://127.0.0.1: a server this bench started
    with urllib.request.urlopen(request, timeout=10) as response:  # nosec B310
        answer: bytes = response.read()
        return answer


def _start(name: str, model: Path, workdir: Path, k: int) -> processes.Server:
    if name == "constant":
        port = processes.free_port()
        server = processes.start(
            f"{name}-{k}",
            [sys.executable, "-m", "bench.constant_app", "--port", str(port)],
            port,
            workdir / f"{name}-{k}.log",
            cwd=REPO,
        )
        processes.wait_ready(server)
        return server
    env = {"PI_WORKERS": name.split("-")[1], "PI_STORE_PATH": str(workdir / f"{name}-{k}.sqlite3")}
    return processes.start_service(f"{name}-{k}", model, workdir, env, cwd=REPO)


def _worker_peaks_mb(parent: int) -> list[float]:
    """Each worker process's peak RSS (VmHWM): the parent's spawned children."""
    peaks = []
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        if b"spawn_main" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            continue  # multiprocessing's resource tracker
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return peaks


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its children so far."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [str(pid), *Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def _idle_s() -> float:
    """Idle CPU seconds of the whole machine so far (/proc/stat: idle + iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def measure(
    model: Path, workdir: Path, connections: list[int], rounds: int, duration: int
) -> tuple[list[Phase], list[float]]:
    body = workdir / "predict.json"
    body.write_bytes(bodies.predict_body())
    lua = wrk.write_post_script(workdir / "predict.lua", body)
    phases: list[Phase] = []
    peaks: list[float] = []
    answer = b""
    for k in range(1, rounds + 1):
        for name in SERVERS:
            server = _start(name, model, workdir, k)
            try:
                got = _post(server.url + "/predict", body.read_bytes())
                if name != "constant":
                    answer = answer or got
                    if got != answer:
                        raise RuntimeError(f"{name} answered {got[:200]!r}, one worker {answer[:200]!r}")
                wrk.run(server.url + "/predict", script=lua, connections=max(connections), duration_s=2)
                for c in connections:
                    cpu, idle, t0 = _tree_cpu_s(server.process.pid), _idle_s(), time.monotonic()
                    r = wrk.run(server.url + "/predict", script=lua, connections=c, duration_s=duration)
                    elapsed = time.monotonic() - t0
                    used = (_tree_cpu_s(server.process.pid) - cpu) / elapsed
                    idle = (_idle_s() - idle) / elapsed
                    phases.append(
                        Phase(name, k, c, r.requests_per_s, r.p50_ms, r.p99_ms, r.errors, used, idle)
                    )
                    print(
                        f"  {name} round {k}, {c} conn: {r.requests_per_s:,.0f} req/s, p99 {r.p99_ms:.2f} ms"
                    )
                if name == "workers-2":
                    peaks += _worker_peaks_mb(server.process.pid)
            finally:
                server.stop()
    return phases, peaks


def _sum(phases: list[Phase], server: str, connections: int, attr: str) -> float:
    return float(sum(getattr(p, attr) for p in phases if p.server == server and p.connections == connections))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workers", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--connections", default="1,16,64", help="comma-separated (default 1,16,64)")
    parser.add_argument("--json", type=Path, help="default: bench/results/workers-<time>.json")
    args = parser.parse_args(argv)
    connections = sorted(int(c) for c in args.connections.split(","))
    top = max(connections)
    before = machine.load_average()
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as scratch:
        phases, peaks = measure(args.model, Path(scratch), connections, args.rounds, args.duration)
    after = machine.load_average()
    host = machine.describe()
    scaling = _sum(phases, "workers-2", top, "requests_per_s") / _sum(
        phases, "workers-1", top, "requests_per_s"
    )
    p99_two = _sum(phases, "workers-2", top, "p99_ms") / args.rounds
    p99_floor = _sum(phases, "constant", top, "p99_ms") / args.rounds
    met = {
        "scaling": scaling >= TARGET_SCALING,
        "p99": p99_two <= TARGET_P99_FACTOR * p99_floor,
        "rss": bool(peaks) and max(peaks) <= TARGET_RSS_MB,
    }
    print()
    print(
        f"Run {started}: {host.cpu_model}, {host.usable_cpus} usable CPUs; "
        f"load average before {before[0]}, after {after[0]}"
    )
    print()
    print(
        "| connections | constant req/s | 1 worker req/s | 2 workers req/s | 2 ÷ 1 "
        "| p99 ms constant / 1 / 2 | server CPUs constant / 1 / 2 | idle CPUs constant / 1 / 2 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    n = args.rounds
    for c in connections:
        rps = [_sum(phases, s, c, "requests_per_s") / n for s in SERVERS]
        p99 = [_sum(phases, s, c, "p99_ms") / n for s in SERVERS]
        used = [_sum(phases, s, c, "service_cpus") / n for s in SERVERS]
        idle = [_sum(phases, s, c, "idle_cpus") / n for s in SERVERS]
        print(
            f"| {c} | {rps[0]:,.0f} | {rps[1]:,.0f} | {rps[2]:,.0f} | {rps[2] / rps[1]:.2f} x | "
            f"{p99[0]:.2f} / {p99[1]:.2f} / {p99[2]:.2f} | "
            f"{used[0]:.2f} / {used[1]:.2f} / {used[2]:.2f} | {idle[0]:.2f} / {idle[1]:.2f} / {idle[2]:.2f} |"
        )
    print()

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(
        f"- 2 workers ÷ 1 at {top} connections: {scaling:.2f} x "
        f"(≥ {TARGET_SCALING}: {verdict(met['scaling'])})"
    )
    print(
        f"- 2 workers' p99 at {top} connections {p99_two:.2f} ms vs constant floor {p99_floor:.2f} ms "
        f"(≤ {TARGET_P99_FACTOR:g} x: {verdict(met['p99'])})"
    )
    print(
        f"- peak RSS per worker: {', '.join(f'{p:.0f}' for p in peaks)} MB "
        f"(≤ {TARGET_RSS_MB:.0f}: {verdict(met['rss'])})"
    )
    machine.write_run(
        "workers",
        started,
        args.json,
        host,
        (before, after),
        {
            "phases": [asdict(p) for p in phases],
            "scaling": scaling,
            "p99_ms": {"workers-2": p99_two, "constant": p99_floor},
            "worker_peak_rss_mb": peaks,
            "met": met,
        },
    )
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
