"""``python -m bench --model PATH [--duration 10s] [--json PATH] [--only predict] ...``: run, print
the tables, write JSON.

Progress goes to stderr, the tables to stdout. Ctrl-C or SIGTERM stops every server the run started
before the process exits; a failed run exits 1 and writes no JSON.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench import harness, report
from bench.processes import StartError
from bench.wrk import WrkError

_RESULTS = Path(__file__).resolve().parent / "results"
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m)?\s*$")


def parse_duration(text: str) -> int:
    """``"10"``, ``"10s"`` or ``"1m"`` -> whole seconds (wrk's own resolution)."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration in whole seconds or minutes: {text!r}")
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def _connections(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("connection counts must be >= 1")
    return values


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service against raw onnxruntime and a constant-answer FastAPI app.",
    )
    parser.add_argument("--model", type=Path, required=True, help="the model.onnx to serve and measure")
    parser.add_argument("--duration", type=parse_duration, default=10, help="per phase (default 10s)")
    parser.add_argument("--warmup", type=parse_duration, default=2, help="per server (default 2s; 0 = none)")
    parser.add_argument(
        "--connections", type=_connections, default=(1, 16, 64), help="for /predict (default 1,16,64)"
    )
    parser.add_argument("--batch-connections", type=int, default=2, help="for /predict/batch (default 2)")
    parser.add_argument(
        "--wrk-threads", type=int, default=1, help="wrk threads (default 1: 2 cores are shared)"
    )
    parser.add_argument("--batch-users", type=int, default=1000, help="users per /predict/batch request")
    parser.add_argument(
        "--json", type=Path, help="where to write the JSON (default bench/results/<time>.json)"
    )
    parser.add_argument("--workdir", type=Path, help="keep bodies, Lua scripts and server logs here")
    parser.add_argument(
        "--only",
        choices=("predict", "monitoring", "v2"),
        help="predict: only the /predict phases (raw onnxruntime batch 1, constant FastAPI, "
        "the service with and without micro-batching), for a quick A/B; monitoring: only /predict "
        "with model monitoring on and off; v2: only the columnar /predict/batch against V2 "
        "inference (JSON and binary tensors) of the same users",
    )
    parser.add_argument(
        "--monitoring-rounds",
        type=int,
        default=3,
        help="alternating rounds of /predict with model monitoring on and off (default 3; 0 = none)",
    )
    parser.add_argument(
        "--shadow-sample",
        type=float,
        default=0.1,
        help="each monitoring round also runs a server with a shadow model (a copy of --model "
        "under another version) scoring this fraction of calls (default 0.1; 0 = none)",
    )
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.model.is_file():
        _say(f"model file not found: {args.model}")
        return 2
    # SIGTERM takes the Ctrl-C path, so the `finally` blocks stop the servers either way. SIGINT is
    # set too: a shell starts background jobs with it ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        options = harness.Options(
            model=args.model,
            workdir=args.workdir if args.workdir is not None else Path(scratch),
            duration_s=args.duration,
            warmup_s=args.warmup,
            connections=args.connections,
            batch_connections=args.batch_connections,
            wrk_threads=args.wrk_threads,
            batch_users=args.batch_users,
            phases="all" if args.only is None else args.only,
            monitoring_rounds=args.monitoring_rounds,
            shadow_sample=args.shadow_sample,
        )
        try:
            result = harness.run(options, _say)
        except KeyboardInterrupt:
            _say("interrupted; every server it started is stopped")
            return 130
        except (harness.BenchError, StartError, WrkError) as exc:
            _say(f"failed: {exc}")
            return 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = report.write_json(result, args.json if args.json is not None else _RESULTS / f"{stamp}.json")
    sys.stdout.write(report.markdown(result))
    _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
