"""A run's results: the tables (Markdown, so they paste into bench/README.md) and the same as JSON.

Every service row carries its ratio to its floor and, where the serving targets set one, the
target and whether this run met it. A second, small table sets the service's ``/predict`` with micro-batching
against the same service without it, connection count by connection count: the default should be
the one that wins where it matters. A third sets ``/predict`` with model monitoring (outcome
recording and drift, the default) against without it, round by round.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.bodies import V2_PATH
from bench.floors import OrtFloor
from bench.machine import Machine

#: The serving targets (bench/README.md, "Targets"), as ratios and limits on one run.
TARGET_PREDICT_RATIO_64 = 0.9
TARGET_PREDICT_P99_MS_64 = 15.0
TARGET_PREDICT_P50_MS_1 = 0.4
#: A lone /predict's p50 over what it cannot beat: the constant floor's p50 plus a batch-1
#: ``session.run``'s, at one connection.
TARGET_PREDICT_P50_FLOORS_1 = 1.5
TARGET_BATCH_RATIO = 0.25
TARGET_COLUMNS_RATIO = 0.4
TARGET_ARROW_RATIO = 0.6
#: /predict/batch body formats: rows (the JSON objects), columnar JSON, Arrow IPC stream.
BODY_LABELS = {
    "rows": "JSON rows",
    "columns": "columnar JSON",
    "arrow": "Arrow IPC",
    "v2": "V2 JSON",
    "v2_binary": "V2 binary tensors",
}
_BATCH_KEYS = {"rows": "batch", "columns": "batch_columns", "arrow": "batch_arrow"}
_BATCH_TARGETS = {"rows": TARGET_BATCH_RATIO, "columns": TARGET_COLUMNS_RATIO, "arrow": TARGET_ARROW_RATIO}
TARGET_PEAK_RSS_MB = 300.0
#: V2 inference (``V2_PATH``) users/s over the columnar JSON ``/predict/batch``'s, same users, same run.
TARGET_V2_RATIO = 0.9
_V2_KEYS = {"v2": "v2_vs_columns", "v2_binary": "v2_binary_vs_columns"}
#: A micro-batching ratio closer to 1 than this is no win either way on a shared 2-core machine
#: (interleaved A/B rounds there differ by a few per cent).
MICROBATCH_TIE = 0.05

#: Model monitoring on ÷ off at 64 connections: what recording and drift may cost.
TARGET_MONITORING_RATIO_64 = 0.95
#: A shadow model on a sample of calls ÷ monitoring without one, at 64 connections.
TARGET_SHADOW_RATIO_64 = 0.85

#: Which phases a run measures: all, only those of ``/predict`` (``--only predict``), or only the
#: monitoring comparison (``--only monitoring``).
Phases = Literal["all", "predict", "monitoring", "v2"]
#: The second service process, started with ``PI_MICROBATCH=false`` for ``/predict`` only.
UNBATCHED_SERVER = "service-unbatched"
#: The servers of the monitoring comparison: outcome recording and drift on, and both off.
MONITORED_SERVER = "service-monitored"
UNMONITORED_SERVER = "service-unmonitored"
#: Monitored as above, with a shadow model scoring a sample of the calls (``--shadow-sample``).
SHADOWED_SERVER = "service-shadowed"
_MONITORING_SERVERS = (MONITORED_SERVER, UNMONITORED_SERVER)
#: Their phase: ``/predict`` with a new user id on every request (recording keeps one per user and day).
NEW_USER_PATH = "/predict, a new user each request"


@dataclass(frozen=True)
class HttpPhase:
    """One wrk run against one server and path."""

    server: str  # "service", "service-unbatched" or "constant"
    path: str
    connections: int
    users_per_request: int
    requests: int
    duration_s: float
    requests_per_s: float
    users_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    errors: int  # socket errors + non-2xx answers: a run with errors is not a valid measurement
    body: str = "rows"  # /predict/batch body format: rows, columns or arrow


@dataclass(frozen=True)
class RunSettings:
    """How the run was made."""

    model: str
    model_version: str
    service_provider: str  # what the service's /readyz says it runs on
    floor_provider: str  # what the raw onnxruntime session runs on
    duration_s: int
    warmup_s: int
    wrk: str
    wrk_threads: int
    batch_connections: int
    intra_op_threads: int
    inter_op_threads: int
    service_env: dict[str, str]  # the PI_* variables the service was started with
    microbatch: bool  # the service's PI_MICROBATCH; the second service, if any, has it off
    phases: Phases


@dataclass(frozen=True)
class MonitoringCheck:
    """What the monitored servers did, so the comparison is known to compare something."""

    rounds: int
    reference: bool  # the model file has a score reference: drift really ran
    recorded: int  # predictions the monitored servers wrote for their outcome, all rounds
    drift_window: int  # scores the monitored server held for drift at the end of a round
    shadow_sample: float = 0.0  # the shadowed server's PI_SHADOW_SAMPLE; 0: none ran
    shadow_scored: int = 0  # scoring calls its shadow model scored, all rounds
    shadow_dropped: int = 0  # and those its full queue dropped


@dataclass(frozen=True)
class Report:
    started_at: str
    settings: RunSettings
    machine: Machine
    load_average_after: tuple[float, float, float]
    ort: list[OrtFloor]
    http: list[HttpPhase]
    peak_rss_mb: float  # the kernel's VmHWM for the service process (not the unbatched one)
    sampled_peak_rss_mb: float  # the highest VmRSS sampled from /proc during the run
    rss_samples: int
    monitoring: MonitoringCheck | None = None


@dataclass(frozen=True)
class Row:
    measurement: str
    connections: str
    requests_per_s: str
    users_per_s: str
    p50_ms: str
    p99_ms: str
    ratio: str
    target: str


def _num(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


#: The phase path of ``/predict`` by user id (the history read from the event store).
BY_ID_PATH = "/predict by user id"


def _find(
    http: list[HttpPhase], server: str, path: str, connections: int | None = None, body: str = "rows"
) -> HttpPhase | None:
    for phase in http:
        if (
            phase.server == server
            and phase.path == path
            and connections in (None, phase.connections)
            and phase.body == body
        ):
            return phase
    return None


def _ort(report: Report, batch: int) -> OrtFloor | None:
    return next((f for f in report.ort if f.batch == batch), None)


def ratios(report: Report) -> dict[str, float]:
    """Every service measurement over its floor, keyed as in the JSON."""
    out: dict[str, float] = {}
    for phase in report.http:
        if phase.server != "service":
            continue
        if phase.path == "/predict":
            floor = _find(report.http, "constant", "/predict", phase.connections)
            if floor is not None and floor.requests_per_s > 0:
                out[f"predict_c{phase.connections}"] = phase.requests_per_s / floor.requests_per_s
            one = _ort(report, 1)
            if phase.connections == 1 and floor is not None and one is not None:
                out["predict_c1_p50_floors"] = phase.p50_ms / (floor.p50_ms + one.p50_ms)
        elif phase.path == BY_ID_PATH:
            inline = _find(report.http, "service", "/predict", phase.connections)
            if inline is not None and inline.requests_per_s > 0:
                out[f"by_id_c{phase.connections}"] = phase.requests_per_s / inline.requests_per_s
        elif phase.path == V2_PATH:
            columns = _find(report.http, "service", "/predict/batch", body="columns")
            if columns is not None and columns.users_per_s > 0:
                out[_V2_KEYS[phase.body]] = phase.users_per_s / columns.users_per_s
        elif phase.path == "/predict/batch":
            ort_floor = _ort(report, phase.users_per_request)
            if ort_floor is not None and ort_floor.users_per_s > 0:
                out[_BATCH_KEYS[phase.body]] = phase.users_per_s / ort_floor.users_per_s
    for unbatched in report.http:
        if unbatched.server != UNBATCHED_SERVER or unbatched.path != "/predict":
            continue
        c = unbatched.connections
        floor = _find(report.http, "constant", "/predict", c)
        if floor is not None and floor.requests_per_s > 0:
            out[f"predict_unbatched_c{c}"] = unbatched.requests_per_s / floor.requests_per_s
        batched = _find(report.http, "service", "/predict", c)
        if batched is not None and unbatched.requests_per_s > 0:
            out[f"microbatching_c{c}"] = batched.requests_per_s / unbatched.requests_per_s
    on, off = (_monitoring_phases(report, server) for server in _MONITORING_SERVERS)
    if on and off and sum(p.requests_per_s for p in off) > 0:
        out[f"monitoring_c{on[0].connections}"] = sum(p.requests_per_s for p in on) / sum(
            p.requests_per_s for p in off
        )
    shadowed = _monitoring_phases(report, SHADOWED_SERVER)
    if shadowed and on and sum(p.requests_per_s for p in on) > 0:
        out[f"shadow_c{shadowed[0].connections}"] = sum(p.requests_per_s for p in shadowed) / sum(
            p.requests_per_s for p in on
        )
    return out


def _monitoring_phases(report: Report, server: str) -> list[HttpPhase]:
    return [p for p in report.http if p.server == server and p.path == NEW_USER_PATH]


def microbatching_verdict(ratio: float) -> str:
    """Which setting served more requests/s, given micro-batching on ÷ off."""
    if ratio >= 1 + MICROBATCH_TIE:
        return "on"
    if ratio <= 1 / (1 + MICROBATCH_TIE):
        return "off"
    return f"neither (within {MICROBATCH_TIE:.0%})"


def targets(report: Report) -> dict[str, bool]:
    """The serving targets that this run can judge, each met or not."""
    out: dict[str, bool] = {}
    r = ratios(report)
    one = _find(report.http, "service", "/predict", 1)
    many = _find(report.http, "service", "/predict", 64)
    if one is not None:
        out["predict_c1_p50"] = one.p50_ms <= TARGET_PREDICT_P50_MS_1
    if "predict_c1_p50_floors" in r:
        out["predict_c1_p50_floors"] = r["predict_c1_p50_floors"] <= TARGET_PREDICT_P50_FLOORS_1
    if many is not None and "predict_c64" in r:
        out["predict_c64_ratio"] = r["predict_c64"] >= TARGET_PREDICT_RATIO_64
        out["predict_c64_p99"] = many.p99_ms <= TARGET_PREDICT_P99_MS_64
    for body, key in _BATCH_KEYS.items():
        if key in r:
            out[f"{key}_ratio"] = r[key] >= _BATCH_TARGETS[body]
    if "v2_vs_columns" in r:
        out["v2_vs_columns_ratio"] = r["v2_vs_columns"] >= TARGET_V2_RATIO
    if "monitoring_c64" in r:
        out["monitoring_c64_ratio"] = r["monitoring_c64"] >= TARGET_MONITORING_RATIO_64
    if "shadow_c64" in r:
        out["shadow_c64_ratio"] = r["shadow_c64"] >= TARGET_SHADOW_RATIO_64
    # the target is about the whole benchmark's load, bulk bodies included
    if report.settings.phases == "all":
        out["peak_rss"] = report.peak_rss_mb <= TARGET_PEAK_RSS_MB
    return out


def rows(report: Report) -> list[Row]:
    r = ratios(report)
    met = targets(report)
    table: list[Row] = []
    for f in report.ort:
        table.append(
            Row(
                f"floor: raw onnxruntime, batch {f.batch} (calls/s in req/s)",
                "1 thread",
                _num(f.calls_per_s),
                _num(f.users_per_s),
                _ms(f.p50_ms),
                _ms(f.p99_ms),
                "",
                "",
            )
        )
    for phase in report.http:
        if phase.server in (UNBATCHED_SERVER, *_MONITORING_SERVERS):
            continue  # after the service's peak RSS, which is not theirs, or a table of their own
        users = _num(phase.users_per_s) if phase.users_per_request > 1 else ""
        errors = _errors(phase)
        if phase.server == "constant":
            body = f" {BODY_LABELS[phase.body]}" if phase.users_per_request > 1 else ""
            table.append(
                Row(
                    f"floor: constant FastAPI {phase.path}{body}{errors}",
                    str(phase.connections),
                    _num(phase.requests_per_s),
                    users,
                    _ms(phase.p50_ms),
                    _ms(phase.p99_ms),
                    "",
                    "",
                )
            )
            continue
        ratio, target = "", ""
        if phase.path == "/predict":
            key = f"predict_c{phase.connections}"
            ratio = f"{r[key]:.2f} x constant FastAPI" if key in r else ""
            if f"microbatching_c{phase.connections}" in r:
                ratio += f"; {r[f'microbatching_c{phase.connections}']:.2f} x without micro-batching"
            if phase.connections == 1 and "predict_c1_p50" in met:
                target = f"p50 ≤ {TARGET_PREDICT_P50_MS_1} ms: {_verdict(met['predict_c1_p50'])}"
            if phase.connections == 1 and "predict_c1_p50_floors" in met:
                ratio += f"; p50 {r['predict_c1_p50_floors']:.2f} x (constant + onnxruntime batch 1)"
                target += (
                    f"; p50 ≤ {TARGET_PREDICT_P50_FLOORS_1} x (constant + onnxruntime batch 1): "
                    f"{_verdict(met['predict_c1_p50_floors'])}"
                )
            elif phase.connections == 64 and "predict_c64_ratio" in met:
                target = (
                    f"≥ {TARGET_PREDICT_RATIO_64}x: {_verdict(met['predict_c64_ratio'])}; "
                    f"p99 ≤ {TARGET_PREDICT_P99_MS_64:.0f} ms: {_verdict(met['predict_c64_p99'])}"
                )
        elif phase.path == BY_ID_PATH and f"by_id_c{phase.connections}" in r:
            ratio = f"{r[f'by_id_c{phase.connections}']:.2f} x inline events (history in SQLite)"
        elif phase.path == V2_PATH and _V2_KEYS[phase.body] in r:
            ratio = f"{r[_V2_KEYS[phase.body]]:.2f} x columnar JSON /predict/batch"
            if "v2_vs_columns_ratio" in met and phase.body == "v2":
                target = f"≥ {TARGET_V2_RATIO}x: {_verdict(met['v2_vs_columns_ratio'])}"
        elif phase.path == "/predict/batch" and _BATCH_KEYS[phase.body] in r:
            key = _BATCH_KEYS[phase.body]
            ratio = f"{r[key]:.3f} x raw onnxruntime batch {phase.users_per_request}"
            target = f"≥ {_BATCH_TARGETS[phase.body]}x: {_verdict(met[f'{key}_ratio'])}"
        label = phase.path
        if phase.users_per_request > 1:
            label = f"{phase.path} {BODY_LABELS[phase.body]} ({phase.users_per_request:,} users x 20 events)"
        table.append(
            Row(
                f"service {label}{errors}",
                str(phase.connections),
                _num(phase.requests_per_s),
                users,
                _ms(phase.p50_ms),
                _ms(phase.p99_ms),
                ratio,
                target,
            )
        )
    if report.settings.phases == "monitoring":
        return table
    table.append(
        Row(
            f"service peak RSS: {report.peak_rss_mb:.0f} MB (VmHWM; sampled max "
            f"{report.sampled_peak_rss_mb:.0f} MB over {report.rss_samples} samples)",
            "",
            "",
            "",
            "",
            "",
            "",
            f"≤ {TARGET_PEAK_RSS_MB:.0f} MB: {_verdict(met['peak_rss'])}"
            if "peak_rss" in met
            else "not judged: /predict phases only"
            if report.settings.phases == "predict"
            else "not judged: a partial run",
        )
    )
    for phase in report.http:
        if phase.server != UNBATCHED_SERVER:
            continue
        key = f"predict_unbatched_c{phase.connections}"
        table.append(
            Row(
                f"service {phase.path} (no micro-batching){_errors(phase)}",
                str(phase.connections),
                _num(phase.requests_per_s),
                "",
                _ms(phase.p50_ms),
                _ms(phase.p99_ms),
                f"{r[key]:.2f} x constant FastAPI" if key in r else "",
                "",
            )
        )
    return table


def _errors(phase: HttpPhase) -> str:
    return f" ({phase.errors} errors!)" if phase.errors else ""


_COLUMNS = ("measurement", "conns", "req/s", "users/s", "p50 ms", "p99 ms", "ratio to floor", "target")
_MICROBATCH_COLUMNS = ("conns", "on req/s", "on p99 ms", "off req/s", "off p99 ms", "on ÷ off", "more req/s")


def markdown_table(columns: tuple[str, ...], cells: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in cells]


def microbatching_rows(report: Report) -> list[tuple[str, ...]]:
    """``/predict`` with micro-batching against without, one row per connection count both ran."""
    r = ratios(report)
    out: list[tuple[str, ...]] = []
    for off in report.http:
        key = f"microbatching_c{off.connections}"
        on = _find(report.http, "service", "/predict", off.connections)
        if off.server != UNBATCHED_SERVER or on is None or key not in r:
            continue
        out.append(
            (
                str(off.connections),
                _num(on.requests_per_s) + _errors(on),
                _ms(on.p99_ms),
                _num(off.requests_per_s) + _errors(off),
                _ms(off.p99_ms),
                f"{r[key]:.2f} x",
                microbatching_verdict(r[key]),
            )
        )
    return out


_MONITORING_COLUMNS = ("round", "on req/s", "on p99 ms", "off req/s", "off p99 ms", "on ÷ off", "target")


def monitoring_rows(report: Report) -> list[tuple[str, ...]]:
    """``/predict`` with monitoring on against off, round by round, then all rounds together."""
    on, off = (_monitoring_phases(report, server) for server in _MONITORING_SERVERS)
    return _paired_rows(report, on, off, "monitoring", TARGET_MONITORING_RATIO_64)


def _paired_rows(
    report: Report, these: list[HttpPhase], those: list[HttpPhase], name: str, target_ratio: float
) -> list[tuple[str, ...]]:
    """Two servers' rounds side by side (req/s, p99, ratio), then the mean over all rounds with the
    ratio :func:`ratios` computed as ``<name>_c<connections>`` and its verdict at 64 connections."""
    out: list[tuple[str, ...]] = []
    for k, (a, b) in enumerate(zip(these, those, strict=False)):
        ratio = a.requests_per_s / b.requests_per_s if b.requests_per_s else float("nan")
        out.append(
            (
                str(k + 1),
                _num(a.requests_per_s) + _errors(a),
                _ms(a.p99_ms),
                _num(b.requests_per_s) + _errors(b),
                _ms(b.p99_ms),
                f"{ratio:.3f} x",
                "",
            )
        )
    r, met = ratios(report), targets(report)
    if these and those:
        key = f"{name}_c{these[0].connections}"
        target = (
            f"≥ {target_ratio}x: {_verdict(met[f'{name}_c64_ratio'])}"
            if f"{name}_c64_ratio" in met
            else "judged at 64 connections"
        )
        out.append(
            (
                "all (mean req/s)",
                _num(sum(p.requests_per_s for p in these) / len(these)),
                _ms(max(p.p99_ms for p in these)),
                _num(sum(p.requests_per_s for p in those) / len(those)),
                _ms(max(p.p99_ms for p in those)),
                f"{r[key]:.3f} x" if key in r else "",
                target,
            )
        )
    return out


_SHADOW_COLUMNS = (
    "round",
    "shadow req/s",
    "shadow p99 ms",
    "no shadow req/s",
    "no shadow p99 ms",
    "ratio",
    "target",
)


def shadow_rows(report: Report) -> list[tuple[str, ...]]:
    """``/predict`` with a shadow model against the monitored server without one, round by round."""
    shadowed, on = (_monitoring_phases(report, server) for server in (SHADOWED_SERVER, MONITORED_SERVER))
    return _paired_rows(report, shadowed, on, "shadow", TARGET_SHADOW_RATIO_64)


def _shadow_line(report: Report) -> str:
    check = report.monitoring
    if check is None or not _monitoring_phases(report, SHADOWED_SERVER):
        return ""
    return (
        f"The same load with a shadow model (the served file under another version) scoring "
        f"{check.shadow_sample:.0%} of the scoring calls after each answer (PI_SHADOW_SAMPLE="
        f"{check.shadow_sample:g}; {check.shadow_scored:,} calls scored, {check.shadow_dropped:,} "
        f"dropped by its full queue), against the monitored server without one, in the same rounds:"
    )


def _monitoring_line(report: Report) -> str:
    check = report.monitoring
    on = _monitoring_phases(report, MONITORED_SERVER)
    if check is None or not on:
        return ""
    drift = (
        f"drift on (the model has a score reference; {check.drift_window:,} scores held)"
        if check.reference
        else "drift idle: the model file has no score reference"
    )
    return (
        f"/predict at {on[0].connections} connections, a new user id each request, model monitoring on "
        f"(PI_OUTCOMES=true PI_DRIFT=true: {check.recorded:,} predictions recorded in SQLite; {drift}) "
        f"against off (PI_OUTCOMES=false PI_DRIFT=false), {check.rounds} alternating rounds of fresh servers:"
    )


def _microbatch_line(s: RunSettings) -> str:
    given = s.service_env.get("PI_MICROBATCH")
    source = "the default" if given is None else f"PI_MICROBATCH={given}"
    if s.microbatch:
        line = f"service micro-batching on ({source}); the no-micro-batching rows: PI_MICROBATCH=false"
    else:
        line = f"service micro-batching off ({source}), so no second service without it"
    if s.phases == "monitoring":
        return "the monitoring comparison only (--only monitoring)"
    if s.phases == "v2":
        return "the V2 comparison only (--only v2): columnar JSON /predict/batch against V2 inference"
    return line + ("; /predict phases only (--only predict)" if s.phases == "predict" else "")


def markdown(report: Report) -> str:
    """The header lines and the tables, as Markdown."""
    m, s = report.machine, report.settings
    header = [
        f"Run {report.started_at}: {m.cpu_model}, {m.usable_cpus} usable of {m.logical_cpus} CPUs, "
        f"{m.memory_gib} GiB, Linux {m.kernel}, Python {m.python}",
        f"onnxruntime {m.onnxruntime} on {s.service_provider} (intra-op {s.intra_op_threads}, "
        f"inter-op {s.inter_op_threads} threads); uvicorn {m.packages['uvicorn']}, "
        f"fastapi {m.packages['fastapi']}, pydantic {m.packages['pydantic']}, "
        f"uvloop {m.packages['uvloop']}, httptools {m.packages['httptools']}",
        f"model {s.model} ({s.model_version}); {s.wrk}, {s.wrk_threads} thread(s), "
        f"{s.duration_s} s per phase after {s.warmup_s} s warm-up; load average before "
        f"{m.load_average[0]}, after {report.load_average_after[0]}",
        _microbatch_line(s),
        "",
    ]
    main = [dataclasses.astuple(row) for row in rows(report)]
    lines = markdown_table(_COLUMNS, main) if s.phases != "monitoring" else []
    comparison = microbatching_rows(report)
    if comparison:
        lines += [
            "",
            "/predict with micro-batching (the service rows) against without (PI_MICROBATCH=false):",
            "",
        ]
        lines += markdown_table(_MICROBATCH_COLUMNS, comparison)
    monitoring = monitoring_rows(report)
    if monitoring:
        lines += ["", _monitoring_line(report), ""] if lines else [_monitoring_line(report), ""]
        lines += markdown_table(_MONITORING_COLUMNS, monitoring)
    shadow = shadow_rows(report)
    if shadow:
        lines += ["", _shadow_line(report), ""]
        lines += markdown_table(_SHADOW_COLUMNS, shadow)
    return "\n".join(header + lines) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    data = dataclasses.asdict(report)
    data["ratios"] = ratios(report)
    data["targets_met"] = targets(report)
    return data


def write_json(report: Report, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(report), indent=2) + "\n")
    return path
