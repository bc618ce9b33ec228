"""Soak: minutes of mixed traffic against a real ``python -m service`` process, its RSS sampled.

    python -m bench.soak [--seconds 180] [--clients 4] [--model PATH]     (or: make soak)

Single and batch predictions (rows, columnar JSON, Arrow, V2 inference), every kind of bad
request, probes, scrapes and a model hot swap every few seconds, with a shadow model scoring half
of the calls beside whichever model serves. Model monitoring runs as by default: each
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
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from service.client import NO_RETRY, ApiError, Client, Columns, Event, StoredEvent, User, wire
from service.client.arrow import stream_of
from service.client.wire import Call
from service.drift import ScoreReference
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import start_service

# the admin token of a throwaway local server
TOKEN = "soak-token"  # nosec B105
AS_OF = "1997-09-30T00:00:00Z"
J = "application/json"


def _user(rng: random.Random, i: int) -> User:
    # varied histories, so batches and features take many shapes (arena growth would show); a new
    # user id each time, so outcome recording writes every prediction
    events = [
        Event(f"1997-{rng.randint(1, 9):02d}-{rng.randint(1, 28):02d}T00:00:00Z", 10.0, 2)
        for _ in range(rng.randint(0, 40))
    ]
    return User(f"u-{i}-{rng.randrange(10**12)}", events, AS_OF)


def _users(rng: random.Random) -> list[User]:
    return [_user(rng, i) for i in range(rng.randint(1, 200))]


def _purchases(rng: random.Random) -> list[StoredEvent]:
    """Purchases of a few known users, some after the synthetic models' 4-week horizon (the event
    clock moves on, so the predictions of 1997-09-30 settle) and up to a day later each time."""
    day = 10 + rng.randint(0, 60)
    return [
        StoredEvent(f"u-{k}", f"1997-{9 + day // 30:02d}-{1 + day % 28:02d}T12:00:00Z", 10.0, 2)
        for k in range(rng.randint(1, 5))
    ]


def _arrow(users: list[User]) -> bytes:
    """The same users as an Arrow IPC stream (the bench process has pyarrow)."""
    import pyarrow as pa

    event = pa.struct([("timestamp", pa.string()), ("amount", pa.float64()), ("quantity", pa.int64())])
    rows = [
        [{"timestamp": e.timestamp, "amount": e.amount, "quantity": e.quantity} for e in u.events or ()]
        for u in users
    ]
    events = pa.array(rows, pa.list_(event))
    timestamps = events.flatten().field("timestamp").cast(pa.timestamp("s", tz="UTC"))
    values = pa.StructArray.from_arrays(
        [timestamps, events.flatten().field("amount"), events.flatten().field("quantity")],
        names=["timestamp", "amount", "quantity"],
    )
    table = pa.table(
        {
            "user_id": [u.user_id for u in users],
            "events": pa.ListArray.from_arrays(events.offsets, values),
        }
    )
    return stream_of(table)


def _v2(users: list[User]) -> bytes:
    """The same users as a V2 inference request (epoch seconds, as the V2 model takes them)."""
    c = Columns.from_users(users)
    seconds = [int(datetime.fromisoformat(str(t)).timestamp()) for t in c.timestamp]
    as_of = int(datetime.fromisoformat(AS_OF).timestamp())
    tensors: dict[str, tuple[str, list[Any]]] = {
        "user_id": ("BYTES", list(c.user_id)),
        "offsets": ("INT64", list(c.offsets)),
        "timestamp": ("INT64", seconds),
        "amount": ("FP64", list(c.amount)),
        "quantity": ("INT64", list(c.quantity)),
        "as_of": ("INT64", [as_of] * len(users)),
    }
    inputs = [{"name": k, "shape": [len(v)], "datatype": t, "data": v} for k, (t, v) in tensors.items()]
    return json.dumps({"inputs": inputs}).encode()


ARROW = "application/vnd.apache.arrow.stream"
V2 = "/v2/models/purchase-intent/infer"


#: (kind, the call, expected status): the good ones built by the typed client from typed users
def _requests(rng: random.Random) -> list[tuple[str, Call, int]]:
    return [
        ("single", wire.predict_call(_user(rng, 1)), 200),
        ("single", wire.predict_call(_user(rng, 2)), 200),
        ("single", wire.predict_call(_user(rng, 3)), 200),
        ("batch", wire.batch_call(_users(rng)), 200),
        ("columns", wire.columns_call(Columns.from_users(_users(rng))), 200),
        ("arrow", wire.arrow_call(_arrow(_users(rng))), 200),
        ("v2", Call("POST", V2, _v2(_users(rng)), J), 200),
        ("bad_arrow", Call("POST", "/predict/batch", b"ARROW1 not really", ARROW), 400),
        ("bad_json", Call("POST", "/predict", b'{"user_id": ', J), 400),
        ("invalid", Call("POST", "/predict", b'{"user_id": 1, "events": []}', J), 422),
        (
            "bad_v2",
            Call(
                "POST", V2, b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', J
            ),
            422,
        ),
        ("too_large", Call("POST", "/predict", b"x" * (9 * 2**20), J), 413),
        ("media_type", Call("POST", "/predict", b"user_id=u", "text/plain"), 415),
        ("not_found", Call("GET", "/nope"), 404),
        ("events", wire.events_call(_purchases(rng)), 200),
        ("by_id", wire.predict_call(User("u-0", as_of=AS_OF)), 200),
        ("performance", Call("GET", "/v1/model/performance"), 200),
        ("healthz", Call("GET", "/healthz"), 200),
        ("readyz", Call("GET", "/readyz"), 200),
        ("metrics", Call("GET", "/metrics"), 200),
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
        with Client(server.url) as probe:
            probe.wait_ready(timeout=60)
        started = time.monotonic()
        stop_at = started + args.seconds

        def client(seed: int) -> None:
            # reproducible load, not secrets
            rng = random.Random(seed)  # nosec B311
            # no retries: a 503 here is an error of the run, not something to wait out
            with Client(server.url, timeout=60, retry=NO_RETRY) as c:
                # bodies drawn afresh each round: new users for outcome recording, new shapes
                rounds = (request for _ in itertools.count() for request in _requests(rng))
                for kind, call, want in rounds:
                    if time.monotonic() >= stop_at:
                        return
                    try:
                        status = c.send(call).status_code
                    except ApiError as exc:
                        status = exc.status
                    except httpx.HTTPError as exc:
                        status = None
                        outcome: str | None = f"{kind}: {type(exc).__name__}"
                    if status is not None:
                        outcome = None if status == want else f"{kind}: {status}"
                    with lock:
                        counts[kind] += 1
                        if outcome is not None:
                            errors[outcome] += 1

        def swapper() -> None:
            with Client(server.url, timeout=60, retry=NO_RETRY, admin_token=TOKEN) as c:
                for model in itertools.cycle(models):
                    if time.monotonic() + args.swap_every >= stop_at:
                        return
                    time.sleep(args.swap_every)
                    try:
                        c.reload(str(model))
                        failure = None
                    except (ApiError, httpx.HTTPError) as exc:
                        failure = f"swap: {exc}"
                    with lock:
                        counts["swap"] += 1
                        if failure is not None:
                            errors[failure] += 1

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
