"""The benchmark harness's own parts: wrk's report parsed right, bodies the service accepts, the raw
onnxruntime floor on a tiny model, and the table. No timing thresholds: numbers belong to bench runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pyarrow.ipc
import pytest

from bench import __main__ as bench_main
from bench import bodies, floors, harness, processes, report, wrk
from bench.machine import describe
from service.artifact import ModelMetadata
from service.config import Settings
from service.schemas import BatchPredictRequest, PredictRequest
from tests.conftest import TinyModel
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model

# Captured from `wrk -t1 -c16 -d3s --latency` against bench.constant_app; a `done()` hook printed
# wrk's exact p50 = 2688 us and p99 = 8491 us for the same run.
WRK_MS = """\
Running 3s test @ http://127.0.0.1:47999/predict
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.99ms    1.13ms  12.35ms   90.48%
    Req/Sec     5.49k     0.93k    6.07k    83.33%
  Latency Distribution
     50%    2.69ms
     75%    2.75ms
     90%    3.68ms
     99%    8.49ms
  16430 requests in 3.01s, 3.62MB read
Requests/sec:   5467.18
Transfer/sec:      1.20MB
"""

# Captured from a GET on the POST-only route: every answer a 405, latencies in microseconds.
WRK_US_ERRORS = """\
Running 1s test @ http://127.0.0.1:47999/predict
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   129.86us   95.20us   2.62ms   99.24%
    Req/Sec     8.04k    95.21     8.16k    63.64%
  Latency Distribution
     50%  121.00us
     75%  122.00us
     90%  126.00us
     99%  177.00us
  8792 requests in 1.10s, 1.41MB read
  Non-2xx or 3xx responses: 8792
Requests/sec:   8001.59
Transfer/sec:      1.28MB
"""


def test_wrk_percentiles_come_from_the_latency_distribution() -> None:
    result = wrk.parse_output(WRK_MS)
    # not the Thread Stats line (2.99 ms is the mean, 12.35 ms the max)
    assert result.p50_ms == pytest.approx(2.69)
    assert result.p99_ms == pytest.approx(8.49)
    assert result.percentiles_ms[90.0] == pytest.approx(3.68)
    assert result.requests == 16430
    assert result.duration_s == pytest.approx(3.01)
    assert result.requests_per_s == pytest.approx(5467.18)
    assert result.errors == 0


def test_wrk_microseconds_and_error_answers() -> None:
    result = wrk.parse_output(WRK_US_ERRORS)
    assert result.p50_ms == pytest.approx(0.121)
    assert result.p99_ms == pytest.approx(0.177)
    assert result.non_2xx == 8792
    assert result.errors == 8792


def test_wrk_socket_errors_are_counted() -> None:
    text = WRK_MS.replace(
        "Requests/sec:", "  Socket errors: connect 0, read 2, write 1, timeout 4\nRequests/sec:"
    )
    assert wrk.parse_output(text).socket_errors == 7


@pytest.mark.parametrize(
    ("text", "ms"), [("54.00us", 0.054), ("1.23ms", 1.23), ("2.00s", 2000.0), ("1.50m", 90_000.0)]
)
def test_wrk_time_units(text: str, ms: float) -> None:
    assert wrk.parse_time_ms(text) == pytest.approx(ms)


def test_wrk_output_without_latency_flag_is_refused() -> None:
    without = WRK_MS.split("  Latency Distribution")[0] + "  16430 requests in 3.01s, 3.62MB read\n"
    with pytest.raises(wrk.WrkError, match="--latency"):
        wrk.parse_output(without)
    with pytest.raises(wrk.WrkError):
        wrk.parse_time_ms("12.5")


def test_lua_script_posts_the_body_file(tmp_path: Path) -> None:
    body = tmp_path / 'a "quoted" body.json'
    body.write_bytes(b"{}")
    script = wrk.write_post_script(tmp_path / "post.lua", body).read_text()
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
    assert '\\"quoted\\"' in script


def test_the_new_user_script_rewrites_the_user_id_of_every_request(tmp_path: Path) -> None:
    body = tmp_path / "predict.json"
    body.write_bytes(bodies.predict_body())
    script = wrk.write_new_user_script(tmp_path / "new_user.lua", body, "bench-0").read_text()
    assert 'body:match("^(.-)bench%-0(.*)$")' in script  # "-" is magic in a Lua pattern
    assert "function request()" in script
    assert 'head .. "u" .. tid .. "-" .. n .. tail' in script


def _monitoring_report(on: list[float], off: list[float], connections: int = 64) -> report.Report:
    http: list[report.HttpPhase] = []
    for a, b in zip(on, off, strict=True):
        for server, rps in ((report.MONITORED_SERVER, a), (report.UNMONITORED_SERVER, b)):
            http.append(
                dataclasses.replace(_phase(server, "/predict", connections, rps), path=report.NEW_USER_PATH)
            )
    result = _report(http, phases="monitoring")
    check = report.MonitoringCheck(rounds=len(on), reference=True, recorded=120_000, drift_window=10_000)
    return dataclasses.replace(result, monitoring=check)


def test_the_monitoring_comparison_is_judged_on_all_rounds_together(tmp_path: Path) -> None:
    result = _monitoring_report([4800, 5200, 4600], [5000, 5000, 5000])
    assert report.ratios(result)["monitoring_c64"] == pytest.approx(14_600 / 15_000)
    assert report.targets(result) == {"monitoring_c64_ratio": True}
    table = report.markdown(result)
    assert "| 2 | 5,200 | 20.0 | 5,000 | 20.0 | 1.040 x |  |" in table
    assert "| all (mean req/s) | 4,867 | 20.0 | 5,000 | 20.0 | 0.973 x | ≥ 0.95x: met |" in table
    assert "120,000 predictions recorded in SQLite; drift on" in table
    assert "| measurement |" not in table  # --only monitoring: no main table
    slow = _monitoring_report([4500], [5000])
    assert report.targets(slow) == {"monitoring_c64_ratio": False}
    assert "≥ 0.95x: **missed**" in report.markdown(slow)
    elsewhere = _monitoring_report([4500], [5000], connections=4)
    assert "monitoring_c64_ratio" not in report.targets(elsewhere)
    assert "judged at 64 connections" in report.markdown(elsewhere)
    data = json.loads(report.write_json(result, tmp_path / "m.json").read_text())
    assert data["monitoring"]["recorded"] == 120_000


def test_the_shadow_comparison_is_judged_against_monitoring_without_one() -> None:
    result = _monitoring_report([5000, 5000], [5200, 5200])
    shadowed = [
        dataclasses.replace(_phase(report.SHADOWED_SERVER, "/predict", 64, rps), path=report.NEW_USER_PATH)
        for rps in (4000, 4600)
    ]
    assert result.monitoring is not None
    check = dataclasses.replace(result.monitoring, shadow_sample=0.1, shadow_scored=900, shadow_dropped=3)
    result = dataclasses.replace(result, http=[*result.http, *shadowed], monitoring=check)
    assert report.ratios(result)["shadow_c64"] == pytest.approx(8_600 / 10_000)
    assert report.targets(result) == {"monitoring_c64_ratio": True, "shadow_c64_ratio": True}
    table = report.markdown(result)
    assert "scoring 10% of the scoring calls" in table
    assert "900 calls scored, 3 dropped" in table
    assert "| 1 | 4,000 | 20.0 | 5,000 | 20.0 | 0.800 x |  |" in table
    assert "| all (mean req/s) | 4,300 | 20.0 | 5,000 | 20.0 | 0.860 x | ≥ 0.85x: met |" in table
    slow = dataclasses.replace(result, http=[*result.http[:-1]])
    assert report.targets(slow)["shadow_c64_ratio"] is False
    assert "≥ 0.85x: **missed**" in report.markdown(slow)


def test_the_shadow_copy_is_the_same_graph_under_another_version(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.onnx", metadata=make_metadata(version="v1"))
    copy = harness.shadow_copy(model, tmp_path / "shadow.onnx")
    original, renamed = (onnx.load(str(p)) for p in (model, copy))
    props = {p.key: p.value for p in renamed.metadata_props}
    assert ModelMetadata.from_props(props).model_version == "v1-shadow"
    assert renamed.graph == original.graph


def test_bulk_bodies_hold_the_same_users_as_the_rows() -> None:
    rows = BatchPredictRequest.model_validate_json(bodies.batch_body(users=5)).users
    columns = json.loads(bodies.columnar_body(users=5))["columns"]
    assert columns["user_id"] == [u.user_id for u in rows]
    assert columns["timestamp"] == [int(e.timestamp.timestamp()) for u in rows for e in u.events or ()]
    assert columns["offsets"][-1] == 5 * bodies.EVENTS_PER_USER
    table = pyarrow.ipc.open_stream(bodies.arrow_body(users=5)).read_all()
    assert table["user_id"].to_pylist() == columns["user_id"]
    assert table.num_rows == 5


def test_v2_bodies_hold_the_columnar_users_as_tensors() -> None:
    columns = json.loads(bodies.columnar_body(users=5))["columns"]
    tensors = {t["name"]: t for t in json.loads(bodies.v2_body(users=5))["inputs"]}
    assert {name: t["data"] for name, t in tensors.items()} == columns
    assert all(t["shape"] == [len(t["data"])] for t in tensors.values())
    body, length = bodies.v2_binary_body(users=5)
    head = json.loads(body[:length])
    sizes = {t["name"]: t["parameters"]["binary_data_size"] for t in head["inputs"]}
    assert sum(sizes.values()) == len(body) - length
    assert sizes["timestamp"] == 8 * len(columns["timestamp"])
    assert head["parameters"] == {"binary_data_output": True}


def test_bodies_are_valid_requests_of_the_advertised_size() -> None:
    user = PredictRequest.model_validate_json(bodies.predict_body())
    assert user.events is not None
    assert len(user.events) == bodies.EVENTS_PER_USER
    batch = BatchPredictRequest.model_validate_json(bodies.batch_body(users=50))
    assert len(batch.users) == 50
    assert all(len(u.events or ()) == bodies.EVENTS_PER_USER for u in batch.users)
    assert bodies.predict_body() == bodies.predict_body()  # deterministic


def test_raw_onnxruntime_floor_runs_on_a_tiny_model(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model.onnx")
    session = floors.open_session(model, Settings(model_path=model, providers=("CPUExecutionProvider",)))
    assert session.provider == "CPUExecutionProvider"
    users = BatchPredictRequest.model_validate_json(bodies.batch_body(users=8)).users
    features = floors.features_of(users, session.metadata)
    assert features.shape == (8, *session.metadata.feature_spec.shape)
    floor = floors.measure(session, features, duration_s=0.05)
    assert floor.batch == 8
    assert floor.calls > 0
    assert floor.users_per_s == pytest.approx(floor.calls_per_s * 8)
    assert 0 < floor.p50_ms <= floor.p99_ms


def _phase(
    server: str, path: str, connections: int, rps: float, users: int = 1, body: str = "rows"
) -> report.HttpPhase:
    return report.HttpPhase(
        server=server,
        path=path,
        connections=connections,
        users_per_request=users,
        requests=int(rps * 10),
        duration_s=10.0,
        requests_per_s=rps,
        users_per_s=rps * users,
        p50_ms=0.3,
        p75_ms=0.4,
        p90_ms=0.5,
        p99_ms=20.0,
        errors=0,
        body=body,
    )


def _report(
    http: list[report.HttpPhase],
    ort: list[floors.OrtFloor] | None = None,
    *,
    microbatch: bool = True,
    phases: report.Phases = "all",
    service_env: dict[str, str] | None = None,
) -> report.Report:
    return report.Report(
        started_at="2024-01-01T00:00:00Z",
        settings=report.RunSettings(
            model="m.onnx",
            model_version="v1",
            service_provider="CPUExecutionProvider",
            floor_provider="CPUExecutionProvider",
            duration_s=10,
            warmup_s=2,
            wrk="wrk 4.1.0",
            wrk_threads=1,
            batch_connections=2,
            intra_op_threads=1,
            inter_op_threads=1,
            service_env=service_env or {},
            microbatch=microbatch,
            phases=phases,
        ),
        machine=describe(),
        load_average_after=(0.0, 0.0, 0.0),
        ort=ort or [],
        http=http,
        peak_rss_mb=200.0,
        sampled_peak_rss_mb=190.0,
        rss_samples=10,
    )


def test_table_and_json_carry_ratios_and_targets(tmp_path: Path) -> None:
    ort_1000 = floors.OrtFloor(
        batch=1000, calls=100, seconds=1.0, calls_per_s=100, users_per_s=100_000, p50_ms=10, p99_ms=12
    )
    result = _report(
        [
            _phase("constant", "/predict", 1, 5000),
            _phase("constant", "/predict", 64, 6000),
            _phase("service", "/predict", 1, 2500),
            _phase("service", "/predict", 64, 5700),
            _phase("service", "/predict/batch", 2, 30, users=1000),
            _phase("service", "/predict/batch", 2, 45, users=1000, body="columns"),
            _phase("service", "/predict/batch", 2, 55, users=1000, body="arrow"),
        ],
        [ort_1000],
    )
    ratios = report.ratios(result)
    assert ratios["predict_c1"] == pytest.approx(0.5)
    assert ratios["predict_c64"] == pytest.approx(0.95)
    assert ratios["batch"] == pytest.approx(0.3)
    assert report.targets(result) == {
        "predict_c1_p50": True,
        "predict_c64_ratio": True,
        "predict_c64_p99": False,  # 20 ms > 15 ms
        "batch_ratio": True,
        "batch_columns_ratio": True,
        "batch_arrow_ratio": False,  # 0.55 < 0.6
        "peak_rss": True,
    }
    assert "Arrow IPC (1,000 users x 20 events)" in report.markdown(result)
    table = report.markdown(result)
    assert "0.95 x constant FastAPI" in table
    assert "p99 ≤ 15 ms: **missed**" in table
    data = json.loads(report.write_json(result, tmp_path / "r.json").read_text())
    assert data["targets_met"]["predict_c64_p99"] is False
    assert math.isclose(data["ratios"]["batch"], 0.3)
    assert data["machine"]["onnxruntime"]
    # no unbatched service ran: no comparison table
    assert "without micro-batching" not in table
    assert "on ÷ off" not in table


@pytest.mark.parametrize(("service_p50", "met"), [(0.30, True), (0.33, False)])
def test_a_lone_predict_is_judged_against_the_constant_floor_plus_one_session_run(
    service_p50: float, met: bool
) -> None:
    """p50 at one connection ≤ 1.5 x (constant FastAPI's p50 + a batch-1 session.run's p50)."""
    ort_1 = floors.OrtFloor(
        batch=1, calls=100, seconds=1.0, calls_per_s=100, users_per_s=100, p50_ms=0.05, p99_ms=0.1
    )
    constant = dataclasses.replace(_phase("constant", "/predict", 1, 6000), p50_ms=0.15)
    service = dataclasses.replace(_phase("service", "/predict", 1, 3000), p50_ms=service_p50)
    result = _report([constant, service], [ort_1])
    assert report.ratios(result)["predict_c1_p50_floors"] == pytest.approx(service_p50 / 0.2)
    assert report.targets(result)["predict_c1_p50_floors"] is met
    verdict = "met" if met else "**missed**"
    assert f"p50 ≤ 1.5 x (constant + onnxruntime batch 1): {verdict}" in report.markdown(result)


UNBATCHED = report.UNBATCHED_SERVER


def _predict_comparison(unbatched_errors: int = 0) -> report.Report:
    return _report(
        [
            _phase("constant", "/predict", 1, 5000),
            _phase("constant", "/predict", 16, 6000),
            _phase("constant", "/predict", 64, 6000),
            _phase("service", "/predict", 1, 2000),
            _phase("service", "/predict", 16, 3000),
            _phase("service", "/predict", 64, 3600),
            dataclasses.replace(_phase(UNBATCHED, "/predict", 1, 2050), p99_ms=0.7),
            _phase(UNBATCHED, "/predict", 16, 1500),
            dataclasses.replace(_phase(UNBATCHED, "/predict", 64, 1800), errors=unbatched_errors),
        ]
    )


def test_unbatched_rows_carry_their_floor_ratio_and_the_micro_batching_ratio(tmp_path: Path) -> None:
    result = _predict_comparison()
    ratios = report.ratios(result)
    assert ratios["predict_unbatched_c16"] == pytest.approx(0.25)  # 1500 / 6000
    assert ratios["microbatching_c16"] == pytest.approx(2.0)  # 3000 / 1500
    assert ratios["microbatching_c1"] == pytest.approx(2000 / 2050)
    assert ratios["predict_c64"] == pytest.approx(0.6)  # the service's own ratio is unchanged
    table = report.markdown(result)
    assert (
        "| service /predict (no micro-batching) | 16 | 1,500 |  | 0.300 | 20.0 | 0.25 x constant FastAPI |"
        in table
    )
    batched = "| service /predict | 16 | 3,000 |  | 0.300 | 20.0 | 0.50 x constant FastAPI; 2.00 x without"
    assert batched + " micro-batching |" in table
    # the unbatched rows come after the peak RSS row, which is the first service's only
    lines = table.splitlines()
    rss = next(i for i, line in enumerate(lines) if "peak RSS" in line)
    assert all(i > rss for i, line in enumerate(lines) if "(no micro-batching)" in line)
    assert "micro-batching on (the default); the no-micro-batching rows: PI_MICROBATCH=false" in table
    # the comparison table: one row per connection count, and which setting served more
    assert "| 1 | 2,000 | 20.0 | 2,050 | 0.700 | 0.98 x | neither (within 5%) |" in table
    assert "| 16 | 3,000 | 20.0 | 1,500 | 20.0 | 2.00 x | on |" in table
    assert "| 64 | 3,600 | 20.0 | 1,800 | 20.0 | 2.00 x | on |" in table
    data = json.loads(report.write_json(result, tmp_path / "r.json").read_text())
    assert [p["server"] for p in data["http"]].count(UNBATCHED) == 3
    assert data["ratios"]["microbatching_c64"] == pytest.approx(2.0)
    assert data["ratios"]["predict_unbatched_c64"] == pytest.approx(0.3)
    assert data["settings"]["microbatch"] is True


def test_unbatched_errors_are_flagged_in_both_tables() -> None:
    table = report.markdown(_predict_comparison(unbatched_errors=7))
    assert "| service /predict (no micro-batching) (7 errors!) | 64 |" in table
    assert "| 64 | 3,600 | 20.0 | 1,800 (7 errors!) |" in table


@pytest.mark.parametrize(
    ("ratio", "verdict"),
    [(2.0, "on"), (1.05, "on"), (1.04, "neither (within 5%)"), (0.96, "neither (within 5%)"), (0.95, "off")],
)
def test_micro_batching_verdict_needs_a_five_percent_lead(ratio: float, verdict: str) -> None:
    assert report.microbatching_verdict(ratio) == verdict


def test_a_service_already_unbatched_is_named_so() -> None:
    result = _report(
        [_phase("constant", "/predict", 1, 5000), _phase("service", "/predict", 1, 2000)],
        microbatch=False,
        service_env={"PI_MICROBATCH": "false"},
    )
    table = report.markdown(result)
    assert "service micro-batching off (PI_MICROBATCH=false), so no second service without it" in table
    assert "on ÷ off" not in table


def test_a_predict_only_run_does_not_judge_peak_rss() -> None:
    result = _report(
        [_phase("constant", "/predict", 1, 5000), _phase("service", "/predict", 1, 2000)], phases="predict"
    )
    assert "peak_rss" not in report.targets(result)
    table = report.markdown(result)
    assert "not judged: /predict phases only" in table
    assert "/predict phases only (--only predict)" in table


def test_only_predict_and_monitoring_are_the_phase_subsets() -> None:
    assert bench_main._parse_args(["--model", "m.onnx", "--only", "predict"]).only == "predict"
    assert bench_main._parse_args(["--model", "m.onnx", "--only", "monitoring"]).only == "monitoring"
    assert bench_main._parse_args(["--model", "m.onnx", "--only", "v2"]).only == "v2"
    assert bench_main._parse_args(["--model", "m.onnx"]).only is None
    assert bench_main._parse_args(["--model", "m.onnx"]).monitoring_rounds == 3
    with pytest.raises(SystemExit):
        bench_main._parse_args(["--model", "m.onnx", "--only", "batch"])


@pytest.mark.slow
def test_a_short_run_end_to_end(tiny_model_dir: TinyModel, tmp_path: Path) -> None:
    """The whole harness, one second a phase, on the real tiny model: it measures every row, writes
    the JSON and leaves no server behind. Needs Debian's wrk (installed by scripts/system-deps.sh)."""
    if shutil.which("wrk") is None:
        message = "'wrk' not found on PATH: run scripts/system-deps.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "run.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "bench",
            "--model", str(tiny_model_dir.model),
            "--duration", "1s", "--warmup", "0",
            "--connections", "1,4",
            "--batch-users", "20",
            "--monitoring-rounds", "1",
            "--json", str(out),
            "--workdir", str(tmp_path / "work"),
        ],
        capture_output=True, text=True, timeout=180, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert [(p["server"], p["path"], p["connections"]) for p in data["http"]] == [
        ("constant", "/predict", 1),
        ("constant", "/predict", 4),
        ("constant", "/predict/batch", 2),
        ("service", "/predict", 1),
        ("service", "/predict", 4),
        ("service", "/predict/batch", 2),
        ("service", "/predict/batch", 2),
        ("service", "/predict/batch", 2),
        ("service", bodies.V2_PATH, 2),
        ("service", bodies.V2_PATH, 2),
        ("service", "/predict by user id", 4),
        # the second service, micro-batching off, /predict only
        ("service-unbatched", "/predict", 1),
        ("service-unbatched", "/predict", 4),
        # model monitoring on, then off: a new user each request
        ("service-monitored", report.NEW_USER_PATH, 4),
        ("service-unmonitored", report.NEW_USER_PATH, 4),
        # monitored, with a shadow model on a tenth of the calls
        ("service-shadowed", report.NEW_USER_PATH, 4),
    ]
    assert [p["body"] for p in data["http"]][-11:-5] == [
        "rows",
        "columns",
        "arrow",
        "v2",
        "v2_binary",
        "rows",
    ]
    assert all(p["errors"] == 0 and p["requests"] > 0 for p in data["http"])
    assert [f["batch"] for f in data["ort"]] == [1, 20]
    assert set(data["ratios"]) == {
        "predict_c1",
        "predict_c1_p50_floors",
        "predict_c4",
        "batch",
        "batch_columns",
        "batch_arrow",
        "v2_vs_columns",
        "v2_binary_vs_columns",
        "by_id_c4",
        "predict_unbatched_c1",
        "predict_unbatched_c4",
        "microbatching_c1",
        "microbatching_c4",
        "monitoring_c4",
        "shadow_c4",
    }
    assert data["monitoring"]["recorded"] > 0  # the monitored server wrote what it served
    assert data["monitoring"]["shadow_scored"] > 0  # and the shadowed one's shadow scored calls
    assert "| service /predict by user id | 4 |" in done.stdout
    assert "x inline events (history in SQLite)" in done.stdout
    assert data["peak_rss_mb"] > 0
    assert "| service /predict | 1 |" in done.stdout
    assert "| service /predict (no micro-batching) | 4 |" in done.stdout
    assert "| 4 | " in done.stdout.split("on ÷ off")[1]  # the comparison table
    logs = [tmp_path / "work" / name for name in ("constant.log", "service.log", "service-unbatched.log")]
    assert all(log.is_file() for log in logs)
    # both services were stopped by the run (SIGTERM: uvicorn logs its shutdown)
    for name in ("service.log", "service-unbatched.log"):
        assert "shutdown" in (tmp_path / "work" / name).read_text().lower()


def test_a_server_that_stopped_answering_fails_the_run_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("starting\nERROR: [Errno 98] address already in use\n")
    process = subprocess.Popen(["true"])
    process.wait()
    server = processes.Server("service", process, f"http://{processes.HOST}:{processes.free_port()}", log)
    with pytest.raises(harness.BenchError, match=r"exited with 0; its log ends:\nstarting\nERROR: .*in use"):
        harness._metric(server, harness.IN_FLIGHT_METRIC)


@pytest.mark.parametrize(("v2_rps", "met"), [(9.5, True), (8.5, False)])
def test_v2_rows_are_judged_against_the_columnar_body_of_the_same_run(v2_rps: float, met: bool) -> None:
    result = _report(
        [
            _phase("service", "/predict/batch", 2, 10.0, users=1000, body="columns"),
            _phase("service", bodies.V2_PATH, 2, v2_rps, users=1000, body="v2"),
            _phase("service", bodies.V2_PATH, 2, 12.0, users=1000, body="v2_binary"),
        ],
        phases="v2",
    )
    r = report.ratios(result)
    assert r["v2_vs_columns"] == pytest.approx(v2_rps / 10.0)
    assert r["v2_binary_vs_columns"] == pytest.approx(1.2)
    assert report.targets(result)["v2_vs_columns_ratio"] is met
    table = report.markdown(result)
    assert f"{v2_rps / 10:.2f} x columnar JSON /predict/batch" in table
    assert ("≥ 0.9x: met" in table) is met
    assert "the V2 comparison only (--only v2)" in table
