"""``python -m bench.train_scale [--scales 1,40] [--today-wall-s S]``: training on CDNOW made 1 and 40
times larger (:mod:`bench.replicas`), ``python -m model_export train --seeds 1 --epochs 2``.

Each scale trains in its own process; peak RSS is that process's own ``ru_maxrss`` from ``wait4``
(:func:`bench.score.run_job`), wall time is the whole process. Targets at the largest scale: peak RSS
within :data:`TARGET_PEAK_RSS_MB`, and wall within :data:`TARGET_WALL_RATIO` of ``--today-wall-s``
(the same run before the change, on the same machine). The table goes to stdout, progress to
stderr, JSON to ``bench/results/train-scale-<time>.json``. See bench/README.md, "Training at scale".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine
from bench.replicas import replicate
from bench.report import markdown_table
from bench.score import run_job

_RESULTS = Path(__file__).resolve().parent / "results"
#: The targets (bench/README.md, "Training at scale"), judged on the largest scale.
TARGET_PEAK_RSS_MB = 4096.0
TARGET_WALL_RATIO = 0.6


@dataclass(frozen=True)
class TrainRun:
    copies: int
    users: int
    rows: int
    exit_code: int  # -9: killed, e.g. by the kernel's out-of-memory killer
    wall_s: float  # the whole process: interpreter, imports, reading, training, export, reports
    train_s: float | None  # the network's own training (report.json's train_seconds)
    peak_rss_mb: float
    model_version: str | None


@dataclass(frozen=True)
class TrainScaleBench:
    started_at: str
    machine: machine.Machine
    seeds: int
    epochs: int
    today_wall_s: float | None
    runs: list[TrainRun]
    load_average_after: tuple[float, float, float]

    def targets(self) -> dict[str, bool]:
        if not self.runs:
            return {}
        big = self.runs[-1]
        ok = big.exit_code == 0
        met = {
            f"{big.copies}x peak RSS <= {TARGET_PEAK_RSS_MB:,.0f} MB": ok
            and big.peak_rss_mb <= TARGET_PEAK_RSS_MB
        }
        if self.today_wall_s is not None:
            limit = TARGET_WALL_RATIO * self.today_wall_s
            met[
                f"{big.copies}x wall <= {TARGET_WALL_RATIO} x today's {self.today_wall_s:g} s ({limit:.0f} s)"
            ] = ok and big.wall_s <= limit
        return met


def run(args: argparse.Namespace, workdir: Path, say: Any) -> TrainScaleBench:
    started = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    about = machine.describe()
    runs: list[TrainRun] = []
    for copies in args.scales:
        say(f"{copies}x: building the log")
        log = replicate(copies, workdir / f"cdnow-x{copies}.parquet")
        out = workdir / f"train-x{copies}"
        argv = [
            sys.executable, "-m", "model_export", "train",
            "--data", str(log.path),
            "--seeds", str(args.seeds),
            "--epochs", str(args.epochs),
            "--no-progress",
            "--out", str(out),
        ]  # fmt: skip
        say(f"{copies}x: training on {log.users:,} customers ({log.rows:,} rows)")
        job = run_job(argv, workdir)
        code, wall, rss = job.code, job.seconds, job.peak_rss_mb
        report = out / "report.json"
        result = json.loads(report.read_text()) if code == 0 and report.is_file() else {}
        if code != 0:
            say(f"{copies}x: the training process failed (exit {code})")
        runs.append(
            TrainRun(
                copies=copies,
                users=log.users,
                rows=log.rows,
                exit_code=code,
                wall_s=wall,
                train_s=result.get("train_seconds"),
                peak_rss_mb=rss,
                model_version=result.get("model_version"),
            )
        )
        shutil.rmtree(out, ignore_errors=True)
    return TrainScaleBench(
        started_at=started,
        machine=about,
        seeds=args.seeds,
        epochs=args.epochs,
        today_wall_s=args.today_wall_s,
        runs=runs,
        load_average_after=machine.load_average(),
    )


_COLUMNS = (
    "log",
    "customers",
    "rows",
    "exit",
    "wall s",
    "network training s",
    "peak RSS MB",
    "KB per customer over the smallest",
)


def _per_customer_kb(run: TrainRun, smallest: TrainRun) -> str:
    """The peak's growth per added customer: what one more customer costs, the fixed part aside."""
    if run.users <= smallest.users:
        return "-"
    return f"{(run.peak_rss_mb - smallest.peak_rss_mb) * 1024 / (run.users - smallest.users):.2f}"


def markdown(bench: TrainScaleBench) -> str:
    m = bench.machine
    cells: list[tuple[str, ...]] = [
        (
            f"{r.copies}x",
            f"{r.users:,}",
            f"{r.rows:,}",
            str(r.exit_code),
            f"{r.wall_s:.1f}",
            "-" if r.train_s is None else f"{r.train_s:.1f}",
            f"{r.peak_rss_mb:,.0f}",
            _per_customer_kb(r, bench.runs[0]),
        )
        for r in bench.runs
    ]
    lines = [
        f"Run {bench.started_at}: {m.cpu_model}, {m.usable_cpus} usable of {m.logical_cpus} CPUs, "
        f"{m.memory_gib} GiB, Linux {m.kernel}, Python {m.python}",
        f"python -m model_export train --seeds {bench.seeds} --epochs {bench.epochs}; load average "
        f"before {m.load_average[0]}, after {bench.load_average_after[0]}",
        "",
        *markdown_table(_COLUMNS, cells),
        "",
        *(f"- {name}: {'met' if ok else '**missed**'}" for name, ok in bench.targets().items()),
    ]
    if bench.today_wall_s is None:
        lines.append("- wall against today's: not judged (no --today-wall-s)")
    return "\n".join(lines) + "\n"


def _scales(text: str) -> tuple[int, ...]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("scales are copies of CDNOW: integers >= 1")
    return tuple(values)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=_scales, default=(1, 40), help="copies of CDNOW (default 1,40)")
    parser.add_argument("--seeds", type=int, default=1, help="train's --seeds")
    parser.add_argument("--epochs", type=int, default=2, help="train's --epochs (fixed: no early stop in 2)")
    parser.add_argument(
        "--today-wall-s",
        type=float,
        help="wall seconds of the same run at the largest scale before the change, on this machine",
    )
    parser.add_argument("--workdir", type=Path, help="keep the logs here (reused by the next run)")
    parser.add_argument(
        "--json", type=Path, help="where to write the JSON (default bench/results/train-scale-<time>.json)"
    )
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(f"bench.train_scale: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        workdir = args.workdir if args.workdir is not None else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = run(args, workdir, _say)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json if args.json is not None else _RESULTS / f"train-scale-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(bench) | {"targets_met": bench.targets()}
    path.write_text(json.dumps(data, indent=2) + "\n")
    sys.stdout.write(markdown(bench))
    _say(f"wrote {path}")
    return 0 if all(r.exit_code == 0 for r in bench.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
