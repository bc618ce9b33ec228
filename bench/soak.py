"""Soak: minutes of mixed traffic against a real ``python -m service`` process, its RSS sampled.

    python -m bench.soak [--seconds 180] [--clients 4] [--model PATH]     (or: make soak)

Single and batch predictions (rows, columnar JSON, Arrow), every kind of bad request, probes,
scrapes and a model hot swap every few seconds, with a shadow model scoring half of the calls
beside whichever model serves. Model monitoring runs as by default: each
prediction names a new user, so outcome recording writes to the event store all along; purchases
stored by ``POST /events``, some of them after the horizon, move the event clock, so the outcome
job settles and scores predictions; the synthetic models carry a score reference, so drift runs.
Any status other than the one expected for its kind, or a transport failure, is an error, and
there must be none (exit 1). RSS is read from /proc every second, its growth counted from the end
of the first tenth of the run (after warm-up). Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from service.drift import ScoreReference
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import start_service, wait_until

# the admin token of a throwaway local server
TOKEN = "soak-token"  # nosec B105
_EVENT = {"timestamp": "1997-09-01T00:00:00Z", "amount": 10.0, "quantity": 2}
J = {"Content-Type": "application/json"}


def _user(rng: random.Random, i: int) -> dict[str, Any]:
    # varied histories, so batches and features take many shapes (arena growth would show); a new
    # user id each time, so outcome recording writes every prediction
    events = [
        {**_EVENT, "timestamp": f"1997-{rng.randint(1, 9):02d}-{rng.randint(1, 28):02d}T00:00:00Z"}
        for _ in range(rng.randint(0, 40))
    ]
    return {"user_id": f"u-{i}-{rng.randrange(10**12)}", "as_of": "1997-09-30T00:00:00Z", "events": events}


def _purchases(rng: random.Random) -> dict[str, Any]:
    """Purchases of a few known users, some after the synthetic models' 4-week horizon (the event
    clock moves on, so the predictions of 1997-09-30 settle) and up to a day later each time."""
    day = 10 + rng.randint(0, 60)
    return {
        "events": [
            {
                **_EVENT,
                "user_id": f"u-{k}",
                "timestamp": f"1997-{9 + day // 30:02d}-{1 + day % 28:02d}T12:00:00Z",
            }
            for k in range(rng.randint(1, 5))
        ]
    }


def _columns(users: list[dict[str, Any]]) -> dict[str, Any]:
    """The same users as a columnar JSON body (RFC 3339 timestamps, as the rows have them)."""
    offsets = [0]
    for u in users:
        offsets.append(offsets[-1] + len(u["events"]))
    events = [e for u in users for e in u["events"]]
    return {
        "columns": {
            "user_id": [u["user_id"] for u in users],
            "as_of": [u["as_of"] for u in users],
            "offsets": offsets,
            "timestamp": [e["timestamp"] for e in events],
            "amount": [e["amount"] for e in events],
            "quantity": [e["quantity"] for e in events],
        }
    }


def _arrow(users: list[dict[str, Any]]) -> bytes:
    """The same users as an Arrow IPC stream (the bench process has pyarrow)."""
    import pyarrow as pa
    import pyarrow.ipc  # the package does not import its ipc submodule

    event = pa.struct([("timestamp", pa.string()), ("amount", pa.float64()), ("quantity", pa.int64())])
    events = pa.array([u["events"] for u in users], pa.list_(event))
    timestamps = events.flatten().field("timestamp").cast(pa.timestamp("s", tz="UTC"))
    values = pa.StructArray.from_arrays(
        [timestamps, events.flatten().field("amount"), events.flatten().field("quantity")],
        names=["timestamp", "amount", "quantity"],
    )
    table = pa.table(
        {
            "user_id": [u["user_id"] for u in users],
            "events": pa.ListArray.from_arrays(events.offsets, values),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


ARROW = {"Content-Type": "application/vnd.apache.arrow.stream"}


#: kind -> (method, path, body or None, headers, expected status)
def _requests(rng: random.Random) -> list[tuple[str, str, str, Any, dict[str, str], int]]:
    return [
        ("single", "POST", "/predict", _user(rng, 1), {}, 200),
        ("single", "POST", "/predict", _user(rng, 2), {}, 200),
        ("single", "POST", "/predict", _user(rng, 3), {}, 200),
        (
            "batch",
            "POST",
            "/predict/batch",
            {"users": [_user(rng, i) for i in range(rng.randint(1, 200))]},
            {},
            200,
        ),
        (
            "columns",
            "POST",
            "/predict/batch",
            _columns([_user(rng, i) for i in range(rng.randint(1, 200))]),
            {},
            200,
        ),
        (
            "arrow",
            "POST",
            "/predict/batch",
            _arrow([_user(rng, i) for i in range(rng.randint(1, 200))]),
            ARROW,
            200,
        ),
        ("bad_arrow", "POST", "/predict/batch", b"ARROW1 not really", ARROW, 400),
        ("bad_json", "POST", "/predict", b'{"user_id": ', J, 400),
        ("invalid", "POST", "/predict", {"user_id": 1, "events": []}, {}, 422),
        ("too_large", "POST", "/predict", b"x" * (9 * 2**20), J, 413),
        ("media_type", "POST", "/predict", b"user_id=u", {"Content-Type": "text/plain"}, 415),
        ("not_found", "GET", "/nope", None, {}, 404),
        ("events", "POST", "/events", _purchases(rng), {}, 200),
        ("by_id", "POST", "/predict", {"user_id": "u-0", "as_of": "1997-09-30T00:00:00Z"}, {}, 200),
        ("performance", "GET", "/v1/model/performance", None, {}, 200),
        ("healthz", "GET", "/healthz", None, {}, 200),
        ("readyz", "GET", "/readyz", None, {}, 200),
        ("metrics", "GET", "/metrics", None, {}, 200),
    ]


_MONITORING = {
    "recorded": ('purchase_intent_outcome_predictions_total{result="recorded"}',),
    "settled": ("purchase_intent_outcome_settled_total{",),
    "matured in the window": ("purchase_intent_live_matured_predictions{",),
    "scores held for drift": ("purchase_intent_score_window_size{",),
    "dropped": (
        'purchase_intent_outcome_predictions_total{result="dropped"}',
        "purchase_intent_drift_dropped_scores_total ",
    ),
    "shadow calls scored": ('purchase_intent_shadow_calls_total{result="scored"}',),
    "shadow calls dropped": ('purchase_intent_shadow_calls_total{result="dropped"}',),
}


def _monitoring(text: str) -> dict[str, float]:
    """What model monitoring did during the run, from the final scrape."""
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return {
        name: sum(float(line.split()[-1]) for line in lines if line.startswith(prefixes))
        for name, prefixes in _MONITORING.items()
    }


def _slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares growth of RSS in bytes per second."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    return sum((t - mean_t) * (r - mean_r) for t, r in samples) / spread if spread else 0.0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--swap-every", type=float, default=5.0, help="seconds between hot swaps")
    parser.add_argument("--model", type=Path, help="default: a synthetic model (the tests' one)")
    parser.add_argument(
        "--shadow-sample",
        type=float,
        default=0.5,
        help="a shadow model (a third synthetic one) scores this fraction of calls all along; 0: none",
    )
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    models = [args.model] if args.model else []
    if not models:
        reference = ScoreReference.of([k / 1000 for k in range(200, 800)])
        models = [
            write_model(
                workdir / f"m{i}.onnx",
                metadata=make_metadata(version=f"soak-{i}", score_reference=reference),
                bias=b,
            )
            for i, b in enumerate((-0.5, 0.3, 0.1))
        ]
    shadow = models.pop() if not args.model else None
    # the outcome job every few seconds rather than every minute: it runs often enough to show
    env = {"PI_ADMIN_TOKEN": TOKEN, "PI_SHUTDOWN_DRAIN_SECONDS": "0", "PI_OUTCOMES_INTERVAL_SECONDS": "5"}
    if shadow is not None and args.shadow_sample > 0:  # beside every hot swap of the served model
        env |= {"PI_SHADOW_MODEL": str(shadow), "PI_SHADOW_SAMPLE": str(args.shadow_sample)}
    server = start_service(models[0], workdir / "service.log", env=env)
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    rss: list[tuple[float, int]] = []
    lock = threading.Lock()
    try:
        wait_until(f"{server.url}/readyz", server.process, timeout=60)
        started = time.monotonic()
        stop_at = started + args.seconds

        def client(seed: int) -> None:
            # reproducible load, not secrets
            rng = random.Random(seed)  # nosec B311
            with httpx.Client(base_url=server.url, timeout=60) as c:
                # bodies drawn afresh each round: new users for outcome recording, new shapes
                rounds = (request for _ in itertools.count() for request in _requests(rng))
                for kind, method, path, body, headers, want in rounds:
                    if time.monotonic() >= stop_at:
                        return
                    try:
                        if isinstance(body, bytes):
                            r = c.request(method, path, content=body, headers=headers)
                        else:
                            r = c.request(method, path, json=body, headers=headers)
                        outcome = None if r.status_code == want else f"{kind}: {r.status_code}"
                    except httpx.HTTPError as exc:
                        outcome = f"{kind}: {type(exc).__name__}"
                    with lock:
                        counts[kind] += 1
                        if outcome is not None:
                            errors[outcome] += 1

        def swapper() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                for model in itertools.cycle(models):
                    if time.monotonic() + args.swap_every >= stop_at:
                        return
                    time.sleep(args.swap_every)
                    r = c.post(
                        "/admin/reload",
                        json={"model_path": str(model)},
                        headers={"Authorization": f"Bearer {TOKEN}"},
                    )
                    with lock:
                        counts["swap"] += 1
                        if r.status_code != 200:
                            errors[f"swap: {r.status_code}"] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=swapper))
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - started, _rss(server.process.pid)))
            time.sleep(1.0)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        monitoring = _monitoring(httpx.get(f"{server.url}/metrics", timeout=10).text)
    finally:
        server.stop()

    total = sum(v for k, v in counts.items() if k != "swap")
    warm = next((r for t, r in rss if t >= args.seconds / 10), rss[0][1])
    end, peak = rss[-1][1], max(r for _, r in rss)
    mib = 2**20
    rate, swaps = total / elapsed, counts["swap"]
    print(f"soak: {elapsed:.0f} s, {args.clients} clients, {total} requests ({rate:.0f}/s), {swaps} swaps")
    print("| kind | requests |")
    print("| --- | --- |")
    for kind, n in sorted(counts.items()):
        print(f"| {kind} | {n} |")
    print(f"errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    print("monitoring: " + ", ".join(f"{name} {value:,.0f}" for name, value in monitoring.items()))
    growth = (end - warm) / mib
    per_minute = growth / max(elapsed / 60, 1e-9)
    print(
        f"RSS: start {rss[0][1] / mib:.1f} MiB, after warm-up {warm / mib:.1f} MiB, "
        f"peak {peak / mib:.1f} MiB, end {end / mib:.1f} MiB, "
        f"growth after warm-up {growth:+.1f} MiB ({per_minute:+.2f} MiB/min)"
    )
    after = [(t, r) for t, r in rss if t >= args.seconds / 10]
    halves = (after[: len(after) // 2], after[len(after) // 2 :])
    slopes = ", ".join(f"{_slope(part) * 60 / mib:+.2f}" for part in (after, *halves))
    print(f"RSS slope after warm-up (least squares, MiB/min): {slopes} (all, first half, second half)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
