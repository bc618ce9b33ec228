"""``python -m bench.auth --model PATH``: what scoped tokens and rate limits cost and how exact the
limit is (``make bench-auth``; bench/README.md, "Tokens and rate limits").

1. ``/predict`` at 64 connections (one user, 20 events, the bench's usual body) from fresh servers
   with ``PI_TOKENS_FILE`` on and off, in alternating rounds; both get the same request bytes,
   ``Authorization`` header included. Target: on ÷ off ≥ 0.95.
2. A rate limit under load: one token hammers ``/predict`` with wrk at 64 connections for the
   whole duration while a second token sends a steady trickle. Target: the first token's accepted
   requests a second within ±10 % of the configured rate (its one-second burst taken off), and the
   second token never rate limited (a 503 of the concurrency limit, which wrk's 64 connections
   fill, is not the rate limiter's and is reported apart).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import bodies, machine, processes, wrk
from bench.harness import REPO

TARGET_TOKENS_RATIO = 0.95
TARGET_RATE_ERROR = 0.10
HAMMER, TRICKLE = "hammer-secret", "trickle-secret"
#: Tokens in the file besides the two used: each request is compared with every configured hash.
OTHER_TOKENS = 20
TRICKLE_PER_S = 10


@dataclass(frozen=True)
class Phase:
    server: str
    round: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass(frozen=True)
class RateRun:
    configured_per_s: float
    duration_s: int
    sent: int
    accepted: int
    accepted_per_s: float  # after the burst: (accepted - burst) / duration
    error: float  # accepted_per_s / configured - 1
    retry_after_seen: bool
    trickle_sent: int
    trickle_refused: int  # 429s: the other token's own limit must never be hit
    trickle_other: dict[str, int]  # any other non-200 answer, by status (e.g. 503 overloaded)


def tokens_file(directory: Path) -> Path:
    lines = [
        f"other-{i}:{hashlib.sha256(f'other-{i}'.encode()).hexdigest()}:predict" for i in range(OTHER_TOKENS)
    ]
    for name, token in (("hammer", HAMMER), ("trickle", TRICKLE)):
        lines.append(f"{name}:{hashlib.sha256(token.encode()).hexdigest()}:predict")
    path = directory / "tokens"
    path.write_text("\n".join(lines) + "\n")
    return path


def script(directory: Path, name: str, body: Path, token: str) -> Path:
    path = wrk.write_post_script(directory / f"{name}.lua", body)
    path.write_text(path.read_text() + f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    return path


def start(name: str, model: Path, workdir: Path, env: dict[str, str]) -> processes.Server:
    env = {"PI_STORE_PATH": str(workdir / f"{name}.sqlite3"), **env}
    return processes.start_service(name, model, workdir, env, cwd=REPO)


def post(url: str, body: bytes, token: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        # http://127.0.0.1: a server this bench started
        with urllib.request.urlopen(request, timeout=10) as response:  # nosec B310
            return int(response.status), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers)


def measure_overhead(model: Path, workdir: Path, body: Path, rounds: int, duration: int) -> list[Phase]:
    tokens = tokens_file(workdir)
    lua = script(workdir, "hammer", body, HAMMER)
    phases = []
    for k in range(rounds):
        for name, env in (("tokens-on", {"PI_TOKENS_FILE": str(tokens)}), ("tokens-off", {})):
            server = start(f"{name}-{k + 1}", model, workdir, env)
            try:
                status, _ = post(server.url + "/predict", body.read_bytes(), HAMMER)
                if status != 200:
                    raise RuntimeError(f"{name}: POST /predict answered {status}")
                wrk.run(server.url + "/predict", script=lua, connections=64, duration_s=2)  # warm-up
                result = wrk.run(server.url + "/predict", script=lua, connections=64, duration_s=duration)
            finally:
                server.stop()
            if result.errors:
                raise RuntimeError(f"{name}: {result.errors} errors under load")
            phases.append(
                Phase(name, k + 1, result.requests_per_s, result.p50_ms, result.p99_ms, result.errors)
            )
            print(f"  {name} round {k + 1}: {result.requests_per_s:,.0f} req/s, p99 {result.p99_ms:.1f} ms")
    return phases


def measure_rate(model: Path, workdir: Path, body: Path, rate: float, duration: int) -> RateRun:
    tokens = tokens_file(workdir)
    env = {"PI_TOKENS_FILE": str(tokens), "PI_RATE_LIMITS": json.dumps({"predict": rate})}
    server = start("rate-limited", model, workdir, env)
    payload = body.read_bytes()
    trickle = {"sent": 0, "refused": 0}
    other: dict[str, int] = {}
    stop = threading.Event()

    def steady() -> None:
        while not stop.wait(1 / TRICKLE_PER_S):
            status, _ = post(server.url + "/predict", payload, TRICKLE)
            trickle["sent"] += 1
            trickle["refused"] += status == 429
            if status not in (200, 429):
                other[str(status)] = other.get(str(status), 0) + 1

    try:
        sender = threading.Thread(target=steady, daemon=True)
        sender.start()
        # a fresh bucket holds one second of the rate: wrk's count includes that burst
        result = wrk.run(
            server.url + "/predict",
            script=script(workdir, "rate", body, HAMMER),
            connections=64,
            duration_s=duration,
        )
        stop.set()
        sender.join(timeout=15)
        # the bucket refills while wrk stops: drain it again to see a refusal's headers
        status, headers = 200, dict[str, str]()
        for _ in range(int(rate * 2) + 10):
            status, headers = post(server.url + "/predict", payload, HAMMER)
            if status == 429:
                break
    finally:
        server.stop()
    accepted = result.requests - result.non_2xx
    per_s = (accepted - rate) / duration
    return RateRun(
        configured_per_s=rate,
        duration_s=duration,
        sent=result.requests,
        accepted=accepted,
        accepted_per_s=per_s,
        error=per_s / rate - 1,
        retry_after_seen=status == 429 and "retry-after" in {k.lower() for k in headers},
        trickle_sent=trickle["sent"],
        trickle_refused=trickle["refused"],
        trickle_other=other,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds (default 3)")
    parser.add_argument("--rate", type=float, default=500.0, help="the limit under test, requests a second")
    parser.add_argument("--json", type=Path, help="default: bench/results/auth-<time>.json")
    args = parser.parse_args(argv)
    before = machine.load_average()
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as scratch:
        workdir = Path(scratch)
        body = workdir / "predict.json"
        body.write_bytes(bodies.predict_body())
        print("tokens on and off, /predict at 64 connections:")
        phases = measure_overhead(args.model, workdir, body, args.rounds, args.duration)
        print(f"rate limit {args.rate:g}/s under wrk at 64 connections:")
        rate = measure_rate(args.model, workdir, body, args.rate, args.duration)
    on = sum(p.requests_per_s for p in phases if p.server == "tokens-on")
    off = sum(p.requests_per_s for p in phases if p.server == "tokens-off")
    ratio = on / off
    after = machine.load_average()
    met_ratio = ratio >= TARGET_TOKENS_RATIO
    met_rate = abs(rate.error) <= TARGET_RATE_ERROR and rate.trickle_refused == 0 and rate.retry_after_seen
    host = machine.describe()
    print()
    print(
        f"Run {started}: {host.cpu_model}, {host.usable_cpus} usable CPUs; "
        f"load average before {before[0]}, after {after[0]}"
    )
    print()
    print("| server | round | req/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for p in phases:
        print(f"| {p.server} | {p.round} | {p.requests_per_s:,.0f} | {p.p50_ms:.2f} | {p.p99_ms:.1f} |")
    print()
    print(
        f"- tokens on ÷ off at 64 connections: {ratio:.3f} "
        f"(≥ {TARGET_TOKENS_RATIO}: {'met' if met_ratio else 'MISSED'})"
    )
    print(
        f"- rate limit {rate.configured_per_s:g}/s: {rate.accepted:,} of {rate.sent:,} accepted "
        f"in {rate.duration_s} s "
        f"= {rate.accepted_per_s:,.1f}/s after the burst ({rate.error:+.1%}); the other token "
        f"{rate.trickle_refused} of {rate.trickle_sent} rate limited (other non-200 answers: "
        f"{rate.trickle_other or 'none'}); Retry-After "
        f"{'present' if rate.retry_after_seen else 'MISSING'} (±{TARGET_RATE_ERROR:.0%}: "
        f"{'met' if met_rate else 'MISSED'})"
    )
    machine.write_run(
        "auth",
        started,
        args.json,
        host,
        (before, after),
        {
            "phases": [asdict(p) for p in phases],
            "tokens_ratio": ratio,
            "rate": asdict(rate),
            "met": {"tokens_ratio": met_ratio, "rate": met_rate},
        },
    )
    return 0 if met_ratio and met_rate else 1


if __name__ == "__main__":
    raise SystemExit(main())
