"""One benchmark run, phase by phase, each bounded in time; every server it starts is stopped.

Order: raw onnxruntime floors (nothing else running), then the constant FastAPI floor, then the
service, then a second service with micro-batching off for its ``/predict`` phases, so the
default is judged against the alternative in the same run on the same machine (MLServer#1826);
last, ``/predict`` with model monitoring on and off, in alternating rounds of fresh servers.
One server runs at a time, so they never compete with each other for the two cores; wrk does share
the machine with the server it loads, as it does for every row alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import onnx

from bench import bodies, floors, machine, processes, wrk
from bench.bodies import V2_PATH
from bench.report import (
    BY_ID_PATH,
    MONITORED_SERVER,
    NEW_USER_PATH,
    SHADOWED_SERVER,
    UNBATCHED_SERVER,
    UNMONITORED_SERVER,
    HttpPhase,
    MonitoringCheck,
    Phases,
    Report,
    RunSettings,
)
from service.artifact import ModelMetadata
from service.bulk import ARROW_MEDIA_TYPE
from service.config import Settings
from service.schemas import BatchPredictRequest, PredictRequest

REPO = Path(__file__).resolve().parents[1]

Say = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    model: Path
    workdir: Path  # bodies, Lua scripts and server logs
    duration_s: int = 10
    warmup_s: int = 2
    connections: tuple[int, ...] = (1, 16, 64)
    batch_connections: int = 2
    wrk_threads: int = 1
    batch_users: int = bodies.BATCH_USERS
    events: int = bodies.EVENTS_PER_USER
    phases: Phases = "all"
    monitoring_rounds: int = 3
    shadow_sample: float = 0.1  # of the shadowed server's scoring calls; 0: no shadowed server


@dataclass(frozen=True)
class Memory:
    """The service's RSS over its phases: the kernel's peak and the sampled one."""

    peak_mb: float
    sampled_peak_mb: float
    samples: int


class BenchError(RuntimeError):
    """The run could not produce a valid measurement (a server failed, a request was refused)."""


@contextlib.contextmanager
def _running(server: processes.Server, say: Say) -> Iterator[processes.Server]:
    try:
        processes.wait_ready(server)
        yield server
    finally:
        say(f"stopping {server.name}")
        server.stop()


def _check_answers(url: str, body: bytes, what: str, content_type: str = "application/json") -> bytes:
    status, answer = processes.post(url, body, content_type)
    if status != 200:
        raise BenchError(f"{what}: POST {url} answered {status}: {answer[:300]!r}")
    return answer


def _metrics_text(server: processes.Server) -> str:
    try:
        # http://127.0.0.1: a server this bench started
        with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:  # nosec B310
            return str(response.read().decode())
    except OSError as exc:
        raise _gone(server, f"GET /metrics failed ({exc})") from exc


def _metric(server: processes.Server, name: str) -> float | None:
    """One unlabelled sample from the service's ``/metrics``, if it is there."""
    lines = _metrics_text(server).splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(name + " ")), None)


def _metric_sum(server: processes.Server, name: str) -> float | None:
    """The sum of every sample of ``name`` (``name{...}`` may pin labels), if there is one."""
    prefix = name if "{" in name else name + "{"
    values = [
        float(line.split()[-1])
        for line in _metrics_text(server).splitlines()
        if line.startswith(prefix) or line.startswith(name + " ")
    ]
    return sum(values) if values else None


def _gone(server: processes.Server, what: str) -> BenchError:
    """The error for a server that stopped answering, with what its log says about why."""
    code = server.process.poll()
    state = "is still running" if code is None else f"exited with {code}"
    return BenchError(f"{server.name}: {what}; the process {state}; its log ends:\n{server.log_tail()}")


def _settle(server: processes.Server, timeout_s: float = 10.0) -> None:
    """Wait until the service has finished the previous phase's requests.

    wrk stops sending when its time is up, but the service may still be working on what it
    accepted (a 1,000-user batch takes ~0.1 s): starting 64 connections on top of that would meet
    the concurrency limit and count the service's own load shedding as errors of the next phase.
    The constant-answer app has no /metrics and answers in microseconds: nothing to wait for.
    """
    if server.name not in _SERVICES:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (_metric(server, IN_FLIGHT_METRIC) or 0.0) <= 1.0:  # the scrape itself
            return
        time.sleep(0.05)


#: The service's in-flight gauge, read by :func:`_settle`.
IN_FLIGHT_METRIC = "purchase_intent_requests_in_flight"
#: Requests that went through the micro-batch queue: none may have, with micro-batching off.
QUEUED_METRIC = "purchase_intent_batch_queue_duration_seconds_count"
_SERVICES = ("service", UNBATCHED_SERVER)


def _http_phase(
    server: processes.Server,
    path: str,
    script: Path,
    connections: int,
    users: int,
    options: Options,
    say: Say,
    body: str = "rows",
) -> HttpPhase:
    _settle(server)
    say(f"{server.name} {path} ({body}): {connections} connection(s) for {options.duration_s} s")
    result = wrk.run(
        server.url + path,
        script=script,
        connections=connections,
        duration_s=options.duration_s,
        threads=options.wrk_threads,
        timeout_s=max(10, options.duration_s),
    )
    if result.errors:
        say(f"  {result.errors} errors ({result.socket_errors} socket, {result.non_2xx} non-2xx)")
    if server.process.poll() is not None:
        raise _gone(server, f"died during the {path} phase at {connections} connection(s)")
    p = result.percentiles_ms
    return HttpPhase(
        server=server.name,
        path=path,
        connections=connections,
        users_per_request=users,
        requests=result.requests,
        duration_s=result.duration_s,
        requests_per_s=result.requests_per_s,
        users_per_s=result.requests_per_s * users,
        p50_ms=p[50.0],
        p75_ms=p.get(75.0, float("nan")),
        p90_ms=p.get(90.0, float("nan")),
        p99_ms=p[99.0],
        errors=result.errors,
        body=body,
    )


def _warm_up(server: processes.Server, script: Path, options: Options, say: Say) -> None:
    if options.warmup_s > 0:
        say(f"{server.name}: warming up for {options.warmup_s} s")
        wrk.run(
            server.url + "/predict",
            script=script,
            connections=max(options.connections),
            duration_s=options.warmup_s,
            threads=options.wrk_threads,
        )


def _predict_phases(server: processes.Server, script: Path, options: Options, say: Say) -> list[HttpPhase]:
    _warm_up(server, script, options, say)
    return [_http_phase(server, "/predict", script, c, 1, options, say) for c in options.connections]


def _load(
    server: processes.Server, scripts: dict[str, Path], options: Options, say: Say, bulk: bool = False
) -> list[HttpPhase]:
    phases = _predict_phases(server, scripts["/predict"], options, say)
    if options.phases == "predict":
        return phases
    phases.append(
        _http_phase(
            server,
            "/predict/batch",
            scripts["/predict/batch"],
            options.batch_connections,
            options.batch_users,
            options,
            say,
        )
    )
    # the bulk formats exist on the service only: their floor is raw onnxruntime, and the V2
    # bodies' the columnar one
    for body in _BULK if bulk else ():
        phases.append(
            _http_phase(
                server,
                V2_PATH if body.startswith("v2") else "/predict/batch",
                scripts[body],
                options.batch_connections,
                options.batch_users,
                options,
                say,
                body=body,
            )
        )
    return phases


_BULK = ("columns", "arrow", "v2", "v2_binary")


def _v2_probabilities(answer: bytes, json_length: int | None = None) -> list[float]:
    if json_length is None:
        outputs = json.loads(answer)["outputs"]
        return list(next(o for o in outputs if o["name"] == "probability")["data"])
    head = json.loads(answer[:json_length])
    size = head["outputs"][0]["parameters"]["binary_data_size"]
    raw = answer[json_length : json_length + size]
    return list(struct.unpack(f"<{size // 4}f", raw))


def _check_v2(url: str, columns: bytes, v2: bytes, v2_binary: tuple[bytes, int]) -> None:
    """The V2 bodies answer what the columnar body answers, to the bit: else their rows would
    compare different work."""
    expected = json.loads(_check_answers(url + "/predict/batch", columns, "service"))["columns"][
        "probability"
    ]
    got = _v2_probabilities(_check_answers(url + V2_PATH, v2, "service V2 JSON"))
    body, length = v2_binary
    request = urllib.request.Request(
        url + V2_PATH,
        data=body,
        method="POST",
        headers={"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"},
    )
    # http://127.0.0.1: a server this bench started
    with urllib.request.urlopen(request, timeout=30) as response:  # nosec B310
        binary = _v2_probabilities(response.read(), int(response.headers["Inference-Header-Content-Length"]))
    if not expected == got == binary:
        raise BenchError("the V2 answers differ from the columnar /predict/batch answer for the same users")


def _service_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PI_")}


def _start_service(
    name: str, options: Options, env: dict[str, str], log: str | None = None
) -> processes.Server:
    port = processes.free_port()
    argv = [sys.executable, "-m", "service", "--model", str(options.model)]
    argv += ["--host", processes.HOST, "--port", str(port)]
    return processes.start(name, argv, port, options.workdir / f"{log or name}.log", cwd=REPO, env=env)


def _probability(answer: bytes) -> float:
    return float(json.loads(answer)["probability"])


def _measure_unbatched(
    script: Path, predict_body: bytes, batched_answer: bytes, options: Options, say: Say
) -> list[HttpPhase]:
    """The service's ``/predict`` phases again, from a second process with micro-batching off.

    The same environment otherwise (PI_* variables pass to both), its own event store file and
    log. Its answer must be the batched service's, and afterwards its queue must have seen no
    request: a comparison with a setting that did not take effect would be no comparison.
    """
    env = {"PI_MICROBATCH": "false", "PI_STORE_PATH": str(options.workdir / f"{UNBATCHED_SERVER}.sqlite3")}
    server = _start_service(UNBATCHED_SERVER, options, env)
    with _running(server, say):
        answer = _check_answers(server.url + "/predict", predict_body, UNBATCHED_SERVER)
        if abs(_probability(answer) - _probability(batched_answer)) > 1e-6:
            raise BenchError(
                f"{UNBATCHED_SERVER} answered {answer[:300]!r}, the service {batched_answer[:300]!r}"
            )
        phases = _predict_phases(server, script, options, say)
        queued = _metric(server, QUEUED_METRIC)
        if queued is None:
            raise BenchError(f"{UNBATCHED_SERVER}: no {QUEUED_METRIC} in /metrics to check it was unbatched")
        if queued:
            raise BenchError(
                f"{UNBATCHED_SERVER}: {queued:.0f} requests went through the micro-batch queue "
                "although it was started with PI_MICROBATCH=false"
            )
    return phases


#: Predictions written for their outcome, and scores held for drift, by a monitored service.
RECORDED_METRIC = 'purchase_intent_outcome_predictions_total{result="recorded"}'
DRIFT_WINDOW_METRIC = "purchase_intent_score_window_size"
#: A monitored service flushes what it recorded and updates drift every second
#: (PI_OUTCOMES_FLUSH_SECONDS, PI_DRIFT_INTERVAL_SECONDS): wait that long before checking both.
_MONITOR_SETTLE_S = 2.0


#: Scoring calls the shadow model scored, and those its full queue dropped.
SHADOW_SCORED_METRIC = 'purchase_intent_shadow_calls_total{result="scored"}'
SHADOW_DROPPED_METRIC = 'purchase_intent_shadow_calls_total{result="dropped"}'


def _monitoring_env(store: Path, on: bool) -> dict[str, str]:
    flag = "true" if on else "false"
    return {"PI_OUTCOMES": flag, "PI_DRIFT": flag, "PI_STORE_BACKEND": "sqlite", "PI_STORE_PATH": str(store)}


def shadow_copy(model: Path, out: Path) -> Path:
    """``model`` under another version (``<version>-shadow``): a shadow must have a version of its
    own, and the same graph costs what a retrained model of the same architecture would."""
    proto = onnx.load(str(model))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = ModelMetadata.from_props(props)
    renamed = dataclasses.replace(meta, model_version=f"{meta.model_version}-shadow")
    onnx.helper.set_model_props(proto, {**props, **renamed.to_props()})
    onnx.save(proto, str(out))
    return out


def _measure_monitoring(
    script: Path, predict_body: bytes, reference: bool, options: Options, say: Say
) -> tuple[list[HttpPhase], MonitoringCheck]:
    """``/predict`` at the highest connection count, a new user id on every request, from fresh
    servers with model monitoring on (outcome recording and drift, as by default) and off, in
    alternating rounds, so a machine that gets busier during the run weighs on both alike.

    Afterwards each monitored server must have recorded predictions (and, for a model with a score
    reference, filled its drift window) and each unmonitored one neither: a comparison with a
    setting that did not take effect would be no comparison.
    """
    connections = max(options.connections)
    phases: list[HttpPhase] = []
    recorded = drift_scores = shadow_scored = shadow_dropped = 0.0
    servers: list[tuple[str, bool]] = [(MONITORED_SERVER, True), (UNMONITORED_SERVER, False)]
    shadow_env: dict[str, str] = {}
    if options.shadow_sample > 0:
        servers.append((SHADOWED_SERVER, True))
        shadow = shadow_copy(options.model, options.workdir / "shadow.onnx")
        shadow_env = {"PI_SHADOW_MODEL": str(shadow), "PI_SHADOW_SAMPLE": str(options.shadow_sample)}
    reference_answer = b""
    for k in range(options.monitoring_rounds):
        for name, on in servers:
            # a store of its own each round: the user ids start again, and would all be duplicates
            env = _monitoring_env(options.workdir / f"{name}-{k + 1}.sqlite3", on)
            if name == SHADOWED_SERVER:
                env |= shadow_env
            server = _start_service(name, options, env, log=f"{name}-{k + 1}")
            with _running(server, say):
                if name == SHADOWED_SERVER:
                    _wait_for_shadow(server)
                answer = _check_answers(server.url + "/predict", predict_body, name)
                # the shadow must not change an answer: every server answers the same bytes
                reference_answer = reference_answer or answer
                if answer != reference_answer:
                    raise BenchError(f"{name} answered {answer[:300]!r}, not {reference_answer[:300]!r}")
                _warm_up(server, script, options, say)
                phase = _http_phase(server, "/predict", script, connections, 1, options, say)
                phases.append(dataclasses.replace(phase, path=NEW_USER_PATH))
                time.sleep(_MONITOR_SETTLE_S if on else 0.0)
                written = _metric_sum(server, RECORDED_METRIC) or 0.0
                held = _metric_sum(server, DRIFT_WINDOW_METRIC) or 0.0
                if name == SHADOWED_SERVER:
                    scored = _metric(server, SHADOW_SCORED_METRIC) or 0.0
                    if scored <= 0:
                        raise BenchError(f"{name}: the shadow model scored no call")
                    shadow_scored += scored
                    shadow_dropped += _metric(server, SHADOW_DROPPED_METRIC) or 0.0
            if on and (written <= 0 or (reference and held <= 0)):
                raise BenchError(
                    f"{name}: {written:.0f} predictions recorded, {held:.0f} scores held for drift"
                )
            if not on and (written or held):
                raise BenchError(f"{name} recorded or held scores although monitoring was off")
            recorded += written
            drift_scores = max(drift_scores, held)
    check = MonitoringCheck(
        rounds=options.monitoring_rounds,
        reference=reference,
        recorded=int(recorded),
        drift_window=int(drift_scores),
        shadow_sample=options.shadow_sample,
        shadow_scored=int(shadow_scored),
        shadow_dropped=int(shadow_dropped),
    )
    return phases, check


def _wait_for_shadow(server: processes.Server, timeout_s: float = 30.0) -> None:
    """The shadow loads after the served model (readiness does not wait for it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # http://127.0.0.1: a server this bench started
        with urllib.request.urlopen(server.url + "/v1/model", timeout=5) as response:  # nosec B310
            roles = [m["role"] for m in json.loads(response.read())["loaded"]]
        if "shadow" in roles:
            return
        time.sleep(0.1)
    raise BenchError(f"{server.name}: no shadow model loaded within {timeout_s:g} s; see its log")


def run(options: Options, say: Say) -> Report:
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    facts = machine.describe()
    workdir = options.workdir
    workdir.mkdir(parents=True, exist_ok=True)

    predict_body = bodies.predict_body(options.events)
    batch_body = bodies.batch_body(options.batch_users, options.events)
    scripts: dict[str, Path] = {}
    for path, body, name in (("/predict", predict_body, "predict"), ("/predict/batch", batch_body, "batch")):
        (workdir / f"{name}.json").write_bytes(body)
        scripts[path] = wrk.write_post_script(workdir / f"{name}.lua", workdir / f"{name}.json")
    columns_body = bodies.columnar_body(options.batch_users, options.events)
    (workdir / "columns.json").write_bytes(columns_body)
    scripts["columns"] = wrk.write_post_script(workdir / "columns.lua", workdir / "columns.json")
    arrow_body = bodies.arrow_body(options.batch_users, options.events)
    (workdir / "arrow.bin").write_bytes(arrow_body)
    scripts["arrow"] = wrk.write_post_script(workdir / "arrow.lua", workdir / "arrow.bin", ARROW_MEDIA_TYPE)
    v2_body = bodies.v2_body(options.batch_users, options.events)
    (workdir / "v2.json").write_bytes(v2_body)
    scripts["v2"] = wrk.write_post_script(workdir / "v2.lua", workdir / "v2.json")
    v2_binary = bodies.v2_binary_body(options.batch_users, options.events)
    (workdir / "v2.bin").write_bytes(v2_binary[0])
    scripts["v2_binary"] = wrk.write_post_script(
        workdir / "v2_binary.lua",
        workdir / "v2.bin",
        "application/octet-stream",
        {"Inference-Header-Content-Length": str(v2_binary[1])},
    )

    # The same settings the service builds from the same environment (PI_* variables apply to both).
    settings = Settings(model_path=options.model)
    try:
        session = floors.open_session(options.model, settings)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise BenchError(f"onnxruntime cannot load {options.model}: {exc}") from exc
    ort_floors = []
    floor_users = [[PredictRequest.model_validate_json(predict_body)]]
    if options.phases == "all":
        floor_users.append(BatchPredictRequest.model_validate_json(batch_body).users)
    if options.phases in ("monitoring", "v2"):
        floor_users = []
    reference = session.metadata.score_reference is not None
    version = session.metadata.model_version
    for users in floor_users:
        features = floors.features_of(users, session.metadata)
        say(f"raw onnxruntime: batch {features.shape[0]} for {options.duration_s} s")
        ort_floors.append(floors.measure(session, features, options.duration_s))
    floor_provider = session.provider
    del session

    python = sys.executable
    http: list[HttpPhase] = []
    new_users = wrk.write_new_user_script(workdir / "new_user.lua", workdir / "predict.json", "bench-0")
    if options.phases == "monitoring":
        phases, only = _measure_monitoring(new_users, predict_body, reference, options, say)
        ready: dict[str, object] = {"model_version": version, "provider": floor_provider}
        none = Memory(0.0, 0.0, 0)
        return _report(
            options, settings, facts, started_at, floor_provider, ready, ort_floors, phases, none, only
        )

    if options.phases == "v2":
        phases, memory, ready = _measure_v2(scripts, columns_body, v2_body, v2_binary, options, say)
        return _report(
            options, settings, facts, started_at, floor_provider, ready, ort_floors, phases, memory, None
        )

    port = processes.free_port()
    constant = processes.start(
        "constant",
        [python, "-m", "bench.constant_app", "--port", str(port)],
        port,
        workdir / "constant.log",
        cwd=REPO,
    )
    with _running(constant, say):
        _check_answers(constant.url + "/predict", predict_body, "constant FastAPI")
        http += _load(constant, scripts, options, say)

    # PI_MICROBATCH as the user set it (or the default) for the service, whose rows the targets
    # judge; the second service exists to show the other setting, so there is none when the user
    # has already switched micro-batching off for the first.
    service = _start_service("service", options, {"PI_STORE_PATH": str(workdir / "events.sqlite3")})
    with _running(service, say):
        # http://127.0.0.1: a server this bench started
        with urllib.request.urlopen(service.url + "/readyz", timeout=5) as response:  # nosec B310
            ready = json.loads(response.read())
        batched_answer = _check_answers(service.url + "/predict", predict_body, "service")
        if options.phases == "all":
            _check_answers(service.url + "/predict/batch", batch_body, "service")
            _check_answers(service.url + "/predict/batch", columns_body, "service")
            _check_answers(service.url + "/predict/batch", arrow_body, "service", ARROW_MEDIA_TYPE)
            _check_v2(service.url, columns_body, v2_body, v2_binary)
            # the same user's history in the event store: /predict by user id next to inline events
            _check_answers(service.url + "/events", bodies.events_body(options.events), "service")
            (workdir / "by_id.json").write_bytes(bodies.by_id_body())
            by_id = wrk.write_post_script(workdir / "by_id.lua", workdir / "by_id.json")
            _check_answers(service.url + "/predict", bodies.by_id_body(), "service")
        with processes.RssSampler(pid=service.process.pid) as rss:
            http += _load(service, scripts, options, say, bulk=True)
            if options.phases == "all":
                phase = _http_phase(service, "/predict", by_id, max(options.connections), 1, options, say)
                http.append(dataclasses.replace(phase, path=BY_ID_PATH))
            memory = Memory((rss.high_water_mark_kib() or 0) / 1024, rss.peak_kib / 1024, rss.samples)

    if settings.microbatch:
        http += _measure_unbatched(scripts["/predict"], predict_body, batched_answer, options, say)
    else:
        say(
            "PI_MICROBATCH is false in this environment: the service rows are already without "
            "micro-batching, so no second service is started"
        )
    check: MonitoringCheck | None = None
    if options.phases == "all" and options.monitoring_rounds > 0:
        phases, check = _measure_monitoring(new_users, predict_body, reference, options, say)
        http += phases
    return _report(
        options, settings, facts, started_at, floor_provider, ready, ort_floors, http, memory, check
    )


def _measure_v2(
    scripts: dict[str, Path],
    columns_body: bytes,
    v2_body: bytes,
    v2_binary: tuple[bytes, int],
    options: Options,
    say: Say,
) -> tuple[list[HttpPhase], Memory, dict[str, object]]:
    """``--only v2``: the columnar ``/predict/batch`` and the V2 bodies of the same users, one server."""
    service = _start_service("service", options, {"PI_STORE_PATH": str(options.workdir / "events.sqlite3")})
    with _running(service, say):
        # http://127.0.0.1: a server this bench started
        with urllib.request.urlopen(service.url + "/readyz", timeout=5) as response:  # nosec B310
            ready = json.loads(response.read())
        _check_v2(service.url, columns_body, v2_body, v2_binary)
        phases = []
        with processes.RssSampler(pid=service.process.pid) as rss:
            for body in ("columns", "v2", "v2_binary"):
                path = V2_PATH if body.startswith("v2") else "/predict/batch"
                phases.append(
                    _http_phase(
                        service,
                        path,
                        scripts[body],
                        options.batch_connections,
                        options.batch_users,
                        options,
                        say,
                        body=body,
                    )
                )
            memory = Memory((rss.high_water_mark_kib() or 0) / 1024, rss.peak_kib / 1024, rss.samples)
    return phases, memory, ready


def _report(
    options: Options,
    settings: Settings,
    facts: machine.Machine,
    started_at: str,
    floor_provider: str,
    ready: dict[str, object],
    ort_floors: list[floors.OrtFloor],
    http: list[HttpPhase],
    memory: Memory,
    monitoring: MonitoringCheck | None,
) -> Report:
    return Report(
        started_at=started_at,
        settings=RunSettings(
            model=str(options.model),
            model_version=str(ready.get("model_version", "unknown")),
            service_provider=str(ready.get("provider", "unknown")),
            floor_provider=floor_provider,
            duration_s=options.duration_s,
            warmup_s=options.warmup_s,
            wrk=wrk.version(),
            wrk_threads=options.wrk_threads,
            batch_connections=options.batch_connections,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            service_env=_service_env(),
            microbatch=settings.microbatch,
            phases=options.phases,
        ),
        machine=facts,
        load_average_after=machine.load_average(),
        ort=ort_floors,
        http=http,
        peak_rss_mb=memory.peak_mb,
        sampled_peak_rss_mb=memory.sampled_peak_mb,
        rss_samples=memory.samples,
        monitoring=monitoring,
    )
