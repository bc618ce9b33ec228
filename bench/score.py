"""``python -m bench.score --model PATH [--scales 1,10,40] [--engines local,ray]``: the batch scoring
job, on each engine, against raw onnxruntime, on CDNOW made 1, 10 and 40 times larger
(:mod:`bench.replicas`).

Each scale runs ``python -m model_export score [--engine ray]`` in its own process, Parquet in and
out, and reads that process's peak RSS from ``wait4`` while a thread samples the memory of every
process below it (Ray's raylet, GCS and workers too); users/s is the job's own clock, from opening
the log to renaming the output. The Ray engine's file is compared with the local engine's. Raw
onnxruntime runs in this process before and after the jobs, at the job's batch size on real encoded
users, with the session options the job gets. The table goes to stdout, progress to stderr, JSON to
``bench/results/score-<time>.json``. See bench/README.md, "Scoring job".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bench import floors, machine, processes
from bench.replicas import replicate
from bench.report import markdown_table
from model_export.data import columns_from_frame, load_transactions
from model_export.score import BATCH_USERS, CHUNK_ROWS, parse_as_of
from service.config import Settings
from service.features import encode_batch

_RESULTS = Path(__file__).resolve().parent / "results"
#: The targets (bench/README.md): end-to-end users/s against raw onnxruntime's at the same batch
#: size, and the largest run's peak RSS against the smallest's.
TARGET_SPEED_RATIO = 0.5
TARGET_RSS_RATIO = 1.5
#: The Ray engine's users/s against the local engine's on the same log: on one machine Ray can only
#: add cost (its value is more machines), and the target bounds that cost.
TARGET_RAY_RATIO = 0.6
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ScaleRun:
    copies: int
    rows: int
    users: int
    partitions: int
    job_seconds: float  # the job's own clock: log opened -> output renamed
    users_per_s: float
    process_seconds: float  # the whole process: interpreter, imports, model load and warm-up too
    peak_rss_mb: float  # the job process's own peak (wait4); for Ray, the driver's alone
    engine: str = "local"
    workers: int = 1  # the local engine's process, or Ray's scoring actors
    tree_pss_mb: float = 0.0  # the highest sampled sum of PSS over the job and every process below it
    tree_rss_mb: float = 0.0  # the same with RSS, which counts a shared page once per process
    processes: int = 0  # the most processes a sample saw
    same_as_local: bool | None = None  # Ray: the file, sorted by user, equals the local engine's


@dataclass(frozen=True)
class ScoreBench:
    started_at: str
    machine: machine.Machine
    model: str
    model_version: str
    batch_users: int
    chunk_rows: int
    intra_op_threads: int
    floor_before: floors.OrtFloor
    floor_after: floors.OrtFloor
    runs: list[ScaleRun]
    load_average_after: tuple[float, float, float]

    @property
    def floor_users_per_s(self) -> float:
        """The faster of the two floor measurements: the stricter ratio."""
        return max(self.floor_before.users_per_s, self.floor_after.users_per_s)

    def local_run(self, copies: int) -> ScaleRun | None:
        return next((r for r in self.runs if r.copies == copies and r.engine == "local"), None)

    def targets(self) -> dict[str, bool]:
        local = [r for r in self.runs if r.engine == "local"]
        met = {
            f"{r.copies}x users/s >= {TARGET_SPEED_RATIO} x raw onnxruntime": r.users_per_s
            >= TARGET_SPEED_RATIO * self.floor_users_per_s
            for r in local
        }
        if len(local) > 1:
            small, large = local[0], local[-1]
            met[f"{large.copies}x peak RSS <= {TARGET_RSS_RATIO} x {small.copies}x"] = (
                large.peak_rss_mb <= TARGET_RSS_RATIO * small.peak_rss_mb
            )
        for r in self.runs:
            base = self.local_run(r.copies)
            if r.engine != "ray" or base is None:
                continue
            met[f"{r.copies}x Ray output identical to the local engine's"] = bool(r.same_as_local)
            met[f"{r.copies}x Ray users/s >= {TARGET_RAY_RATIO} x the local engine's"] = (
                r.users_per_s >= TARGET_RAY_RATIO * base.users_per_s
            )
        return met


# Linux keeps a process's peak RSS across exec, so a job forked from this process (pandas, a model
# session, CDNOW in memory) would report at least this process's size. A bare Python in between,
# a few MB, forks the job instead and reports the job's own peak from wait4.
_WAIT4 = """
import os, subprocess, sys
job = subprocess.Popen(sys.argv[2:], stdout=sys.stderr)  # stdout is for the table
_, status, usage = os.wait4(job.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@dataclass(frozen=True)
class JobRun:
    code: int
    seconds: float
    peak_rss_mb: float  # the command's own process
    tree: processes.TreeSampler  # every process below the bare Python that started it


def run_job(argv: list[str], workdir: Path) -> JobRun:
    """Run a command; its exit code, wall seconds, its own peak RSS and its process tree's memory."""
    peak = workdir / "peak-rss-kib"
    started = time.perf_counter()
    wrapper = subprocess.Popen([sys.executable, "-S", "-c", _WAIT4, str(peak), *argv])
    with processes.TreeSampler(pid=wrapper.pid) as tree:
        code = wrapper.wait()
    return JobRun(code, time.perf_counter() - started, int(peak.read_text()) / 1024, tree)  # KiB on Linux


def same_scores(ours: Path, local: Path) -> bool:
    """The two files hold the same rows once sorted by user (the probabilities bit for bit), and
    the same schema and metadata."""
    a, b = (pq.read_table(path).sort_by("user_id") for path in (ours, local))
    bits = [t.column("probability").to_numpy().view(np.int32) for t in (a, b)]
    return bool(a.schema.equals(b.schema, check_metadata=True) and a.equals(b) and np.array_equal(*bits))


def _floor(model: Path, settings: Settings, batch_users: int, seconds: float) -> floors.OrtFloor:
    """Raw onnxruntime on ``batch_users`` real CDNOW customers, encoded as the job encodes them."""
    session = floors.open_session(model, settings)
    frame = load_transactions("cdnow").frame
    ids = sorted(frame["user_id"].unique())[:batch_users]
    c = columns_from_frame(frame[frame["user_id"].isin(ids)], parse_as_of("1998-06-30"), ids)
    features = encode_batch(
        c.timestamps, c.amounts, c.quantities, c.offsets, c.as_of, session.metadata.feature_spec
    )
    return floors.measure(session, features, seconds)


def run(args: argparse.Namespace, workdir: Path, say: Any) -> ScoreBench:
    settings = Settings(
        inference_batch_users=args.batch_users,
        max_batch_users=args.batch_users,
        **({} if args.threads is None else {"intra_op_threads": args.threads}),
    )
    started = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    about = machine.describe()
    say(f"raw onnxruntime, batch {args.batch_users}, {args.floor_seconds:g} s")
    before = _floor(args.model, settings, args.batch_users, args.floor_seconds)
    runs: list[ScaleRun] = []
    version = ""
    for copies in args.scales:
        say(f"{copies}x: building the log")
        log = replicate(copies, workdir / f"cdnow-x{copies}.parquet")
        outputs: dict[str, Path] = {}
        for engine in args.engines:
            out, report = workdir / f"scores-x{copies}-{engine}.parquet", workdir / f"report-x{copies}.json"
            argv = [
                sys.executable, "-m", "model_export", "score",
                "--engine", engine,
                "--model", str(args.model),
                "--data", str(log.path),
                "--out", str(out),
                "--batch-users", str(args.batch_users),
                "--chunk-rows", str(args.chunk_rows),
                "--threads", str(settings.intra_op_threads),  # with Ray: each actor's CPUs and threads
                "--report", str(report),
                "--no-progress",
            ]  # fmt: skip
            say(f"{copies}x, {engine} engine: scoring {log.users:,} users ({log.rows:,} rows)")
            job = run_job(argv, workdir)
            if job.code != 0:
                raise RuntimeError(f"the {engine} engine failed at {copies}x (exit {job.code})")
            result = json.loads(report.read_text())
            version = result["model_version"]
            if result["users"] != log.users:
                raise RuntimeError(
                    f"{copies}x: the {engine} engine scored {result['users']} users, the log has {log.users}"
                )
            same = same_scores(out, outputs["local"]) if engine != "local" and "local" in outputs else None
            outputs[engine] = out
            runs.append(
                ScaleRun(
                    copies=copies,
                    rows=log.rows,
                    users=log.users,
                    partitions=result["partitions"],
                    job_seconds=result["seconds"],
                    users_per_s=result["users_per_s"],
                    process_seconds=job.seconds,
                    peak_rss_mb=job.peak_rss_mb,
                    engine=engine,
                    workers=result["workers"],
                    tree_pss_mb=job.tree.peak_pss_kib / 1024,
                    tree_rss_mb=job.tree.peak_rss_kib / 1024,
                    processes=job.tree.most_processes,
                    same_as_local=same,
                )
            )
        for out in outputs.values():
            out.unlink()
    say("raw onnxruntime again")
    after = _floor(args.model, settings, args.batch_users, args.floor_seconds)
    return ScoreBench(
        started_at=started,
        machine=about,
        model=str(args.model),
        model_version=version,
        batch_users=args.batch_users,
        chunk_rows=args.chunk_rows,
        intra_op_threads=settings.intra_op_threads,
        floor_before=before,
        floor_after=after,
        runs=runs,
        load_average_after=machine.load_average(),
    )


_COLUMNS = (
    "log",
    "engine",
    "users",
    "rows",
    "spill files",
    "workers",
    "job s",
    "users/s",
    "÷ raw onnxruntime",
    "÷ local",
    "process s",
    "peak RSS MB",
    "Σ PSS MB (processes)",
    "÷ smallest",
)


def markdown(bench: ScoreBench) -> str:
    m = bench.machine
    floor = bench.floor_users_per_s
    smallest: dict[str, float] = {}
    for r in bench.runs:
        smallest.setdefault(r.engine, r.peak_rss_mb)
    cells: list[tuple[str, ...]] = []
    for r in bench.runs:
        base = bench.local_run(r.copies)
        cells.append(
            (
                f"{r.copies}x",
                r.engine,
                f"{r.users:,}",
                f"{r.rows:,}",
                str(r.partitions),
                str(r.workers),
                f"{r.job_seconds:.1f}",
                f"{r.users_per_s:,.0f}",
                f"{r.users_per_s / floor:.2f}",
                f"{r.users_per_s / base.users_per_s:.2f}" if base is not None else "",
                f"{r.process_seconds:.1f}",
                f"{r.peak_rss_mb:.0f}",
                f"{r.tree_pss_mb:.0f} ({r.processes})",
                f"{r.peak_rss_mb / smallest[r.engine]:.2f}",
            )
        )
    lines = [
        f"Run {bench.started_at}: {m.cpu_model}, {m.usable_cpus} usable of {m.logical_cpus} CPUs, "
        f"{m.memory_gib} GiB, Linux {m.kernel}, Python {m.python}, onnxruntime {m.onnxruntime}",
        f"model {bench.model} ({bench.model_version}); batch {bench.batch_users} users, chunk "
        f"{bench.chunk_rows:,} rows, intra-op threads {bench.intra_op_threads}; load average before "
        f"{m.load_average[0]}, after {bench.load_average_after[0]}",
        f"raw onnxruntime at batch {bench.batch_users}: {bench.floor_before.users_per_s:,.0f} users/s "
        f"before the jobs, {bench.floor_after.users_per_s:,.0f} after (ratios use the faster)",
        "",
        *markdown_table(_COLUMNS, cells),
        "",
        *(f"- {name}: {'met' if ok else '**missed**'}" for name, ok in bench.targets().items()),
    ]
    return "\n".join(lines) + "\n"


def _scales(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("scales are copies of CDNOW: integers >= 1")
    return tuple(sorted(values))


def _engines(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names or set(names) - set(ENGINES):
        raise argparse.ArgumentTypeError(f"engines are {', '.join(ENGINES)}: got {text!r}")
    return tuple(e for e in ENGINES if e in names)  # local first: Ray's file is compared with its


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the model.onnx the job scores with")
    parser.add_argument(
        "--scales", type=_scales, default=(1, 10, 40), help="copies of CDNOW (default 1,10,40)"
    )
    parser.add_argument(
        "--engines", type=_engines, default=ENGINES, help="local, ray or both (default local,ray)"
    )
    parser.add_argument("--batch-users", type=int, default=BATCH_USERS, help="users per onnxruntime call")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="the job's --chunk-rows")
    parser.add_argument(
        "--threads", type=int, help="onnxruntime intra-op threads (default: PI_INTRA_OP_THREADS or 1)"
    )
    parser.add_argument("--floor-seconds", type=float, default=5.0, help="each raw onnxruntime measurement")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (reused by the next run)")
    parser.add_argument(
        "--json", type=Path, help="where to write the JSON (default bench/results/score-<time>.json)"
    )
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(f"bench.score: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.model.is_file():
        _say(f"model file not found: {args.model}")
        return 2
    if "ray" in args.engines and find_spec("ray") is None:
        _say("the ray engine needs the ray extra (make env installs it), or pass --engines local")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-score-") as scratch:
        workdir = args.workdir if args.workdir is not None else Path(scratch)
        try:
            bench = run(args, workdir, _say)
        except RuntimeError as exc:
            _say(f"failed: {exc}")
            return 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.json if args.json is not None else _RESULTS / f"score-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(bench) | {"targets_met": bench.targets()}
    path.write_text(json.dumps(data, indent=2) + "\n")
    sys.stdout.write(markdown(bench))
    _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
