"""Deployment files, tested as far as a machine without a Docker engine can.

Prometheus's own ``promtool`` checks the scrape config and every dashboard query; every metric and
label the dashboard uses must appear in what the service really exports; the compose file and the
Grafana provisioning parse and point at files that exist; the image's HEALTHCHECK command is run
against a real server process; the replicas' nginx config is run by nginx in front of two real ones.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.drift import ScoreReference, psi
from tests import waiting
from tests.service.conftest import wait_ready
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import free_port, require_binary, start_service, wait_until
from tests.service.test_monitor import VERSION, client_for, mature_predictions, settings_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "purchase-intent.json"
RULES = ROOT / "deploy" / "rules.yml"
RULE_TESTS = ROOT / "deploy" / "rules.test.yml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMQL_KEYWORDS = {
    "sum", "by", "rate", "increase", "histogram_quantile", "max", "min", "le", "without", "on",
    "group_left", "or", "and", "ln", "clamp_min", "label_replace", "time",
}  # fmt: skip


def _panels() -> list[dict[str, Any]]:
    """Every panel that queries, wherever it sits: rows hold none themselves, and a collapsed row
    keeps its panels inside it, where a plain walk of the top level would miss their queries."""
    panels: list[dict[str, Any]] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


@pytest.fixture
def exported(tmp_path: Path) -> tuple[set[str], set[str]]:
    """Sample names and label names in a live /metrics answer after some traffic, with matured
    predictions and a model that has a score reference (so every monitoring series is there)."""
    registry = CollectorRegistry()
    reference = ScoreReference.of(np.linspace(0.3, 0.7, 500))
    shadow = write_model(tmp_path / "shadow.onnx", metadata=make_metadata(version="shadow-1"), bias=0.2)
    settings = settings_for(tmp_path, drift_min_scores=1, shadow_model=shadow, shadow_sample=1.0)
    with client_for(settings, reference, registry) as client:
        wait_ready(client)
        waiting.wait_until(
            lambda: client.get("/v1/model").json()["loaded"][-1]["role"] == "shadow" or None,
            timeout=10,
            message="no shadow loaded",
        )
        client.post(
            "/predict",
            json={
                "user_id": "u",
                "events": [{"timestamp": "1997-01-01T00:00:00Z", "amount": 1.0, "quantity": 1}],
            },
        )
        client.post("/predict", content=b"{", headers={"Content-Type": "application/json"})
        mature_predictions(client)
        waiting.wait_until(
            lambda: (
                registry.get_sample_value("purchase_intent_score_psi", {"model_version": VERSION}) is not None
            ),
            timeout=10,
            message="no PSI",
        )
        waiting.wait_until(
            lambda: registry.get_sample_value("purchase_intent_shadow_calls_total", {"result": "scored"}),
            timeout=10,
            message="the shadow scored nothing",
        )
        text = client.get("/metrics").text
    names: set[str] = set()
    labels: set[str] = {"job", "instance", "service"}  # added by Prometheus / our scrape config
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            labels.update(sample.labels)
    return names, labels


def test_prometheus_config_passes_promtool() -> None:
    promtool = require_binary("promtool")
    proc = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(_exprs())],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rules() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _metrics_used(expr: str, labels: set[str]) -> set[str]:
    """The metric names ``expr`` reads; every label it names must be in ``labels``."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    for label_list in re.findall(r"\b(?:by|without|on|group_left)\s*\(([^)]*)\)", without_ranges):
        for label in filter(None, (x.strip() for x in label_list.split(","))):
            assert label in labels, f"label {label!r} in {expr!r} is not exported"
    for matchers in re.findall(r"\{([^}]*)\}", without_ranges):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
            assert label in labels, f"label {label!r} in {expr!r} is not exported"
    tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", re.sub(r"\{[^}]*\}", "", without_ranges)))
    metrics = {t for t in tokens if t not in PROMQL_KEYWORDS and t not in labels}
    assert metrics, expr
    return metrics


def test_dashboard_and_rules_use_only_metrics_and_labels_the_service_exports(
    exported: tuple[set[str], set[str]],
) -> None:
    names, labels = exported
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "purchase-intent"
    titles = " ".join(p["title"].lower() for p in _panels())
    for topic in (
        "request rate",
        "latency",
        "errors",
        "batch size",
        "probability",
        "provider",
        "event store",
        "live roc auc",
        "calibration",
        "psi",
        "kolmogorov-smirnov",
        "shadow",
        "canary",
    ):
        assert topic in titles
    for panel in _panels():
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    for rule in _rules():
        missing = sorted(_metrics_used(rule["expr"], labels) - names - recorded)
        assert not missing, f"rule {rule.get('record') or rule['alert']} reads what nobody exports: {missing}"
    used = set().union(*(_metrics_used(expr, labels) for expr in _exprs()))
    missing = sorted(used - names - recorded)
    assert not missing, f"dashboard queries metrics the service does not export: {missing}"
    assert used & recorded, "the dashboard shows the PSI Prometheus recomputes"


def test_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = require_binary("promtool")
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        proc = subprocess.run(
            [promtool, *command], capture_output=True, text=True, timeout=60, cwd=RULES.parent
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts == {
        "LiveAucBelowOffline",
        "ScoreDrift",
        "NoMaturedPredictions",
        "ModelOnCpuFallback",
        "EventStoreDown",
        "HighErrorRate",
    }
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    }
    assert tested == alerts  # each alert has a case that fires and one that does not


def test_the_psi_prometheus_recomputes_is_the_service_s() -> None:
    """The recording rule's unit test expects the value service/drift.py gives for the same bins."""
    case = next(c for c in yaml.safe_load(RULE_TESTS.read_text())["tests"] if "promql_expr_test" in c)
    (expected,) = (t["exp_samples"][0]["value"] for t in case["promql_expr_test"] if "psi" in t["expr"])
    reference = ScoreReference(
        count=10, edges=(0.2, 0.5), proportions=(0.3, 0.4, 0.3), grid=(0.1, 0.9), cdf=(0.5, 1.0)
    )
    served = np.array([0.1] * 10 + [0.3] * 40 + [0.7] * 50)  # 10 %, 40 %, 50 % of the scores per bin
    assert psi(reference, served) == pytest.approx(expected, rel=1e-12)


def test_compose_file_parses_and_points_at_real_files() -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"service", "prometheus", "grafana", "redis", "replica-a", "replica-b", "lb"}
    build = services["service"]["build"]
    assert (ROOT / build["context"] / "Dockerfile").is_file()
    stages = re.findall(
        r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE | re.IGNORECASE
    )
    assert build["target"] in stages
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"] if v.startswith("."))
    mount_point = next(m for m in mounts if home.startswith(m + "/"))
    assert (ROOT / mounts[mount_point] / home.removeprefix(mount_point + "/")).is_file()
    prometheus_config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    target = prometheus_config["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"service:{services['service']['environment']['PI_PORT']}"


def test_compose_runs_two_replicas_on_one_durable_redis() -> None:
    """The ``replicas`` profile: two service containers on the redis backend, one Redis with an
    fsync per write; the default profile keeps its SQLite file in a volume (the root fs is
    read-only)."""
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    redis = services["redis"]
    assert redis["profiles"] == ["replicas"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync always" in command
    host_ports = set()
    for name in ("replica-a", "replica-b"):
        replica = services[name]
        assert replica["profiles"] == ["replicas"]
        assert replica["environment"]["PI_STORE_BACKEND"] == "redis"
        assert replica["environment"]["PI_REDIS_URL"] == "redis://redis:6379/0"
        assert "redis" in replica["depends_on"]
        assert replica["build"]["target"] == services["service"]["build"]["target"]
        host_ports.add(replica["ports"][0].rsplit(":", 1)[0])
    assert len(host_ports) == 2
    assert "profiles" not in services["service"]
    assert services["service"]["read_only"] is True
    for name in ("service", "replica-a", "replica-b"):  # worker processes keep their run directory in /tmp
        assert "/tmp" in services[name]["tmpfs"], name
        assert int(services[name]["environment"]["PI_WORKERS"]) >= 1, name
    mounts = [v.split(":") for v in services["service"]["volumes"]]
    assert ["service-data", "/data"] in mounts
    assert "service-data" in compose["volumes"]
    dockerfile = DOCKERFILE.read_text()
    for stage in ("runtime", "runtime-gpu"):
        body = _stage(dockerfile, stage)
        assert "PI_STORE_PATH=/data/events.sqlite3" in body, stage
        assert "chown 10001:10001 /data" in body, stage


NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def test_compose_puts_nginx_in_front_of_the_replicas() -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    lb = services["lb"]
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+(-alpine)?", lb["image"]), "pin the nginx image's version"
    assert lb["profiles"] == ["replicas"]
    assert set(lb["depends_on"]) == {"replica-a", "replica-b"}
    assert lb["read_only"] is True
    (mount,) = lb["volumes"]
    source, target, mode = mount.split(":")
    assert (ROOT / source).resolve() == NGINX_CONF
    assert (target, mode) == ("/etc/nginx/nginx.conf", "ro")
    conf = NGINX_CONF.read_text()
    # every path nginx writes is on one of the tmpfs mounts
    for path in re.findall(r"^\s*(?:pid|\w+_temp_path)\s+(\S+);", conf, flags=re.M):
        assert any(path.startswith(tmpfs + "/") for tmpfs in lb["tmpfs"]), path
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+);", conf, flags=re.M)
    ports = {name: services[name]["environment"]["PI_PORT"] for name in ("replica-a", "replica-b")}
    assert sorted(upstreams) == sorted(ports.items())
    (listen,) = re.findall(r"^\s*listen\s+(\d+);", conf, flags=re.M)
    assert lb["ports"] == [f"127.0.0.1:{listen}:{listen}"]


def _nginx_for_test(conf: str, upstreams: list[str], port: int, workdir: Path) -> str:
    """The compose file's nginx config with the replica names pointed at ``upstreams`` and every
    path it writes moved into ``workdir``; each rewrite must match, so a reshaped config fails."""
    rewrites = [
        (r"server replica-a:8000;", f"server {upstreams[0]};"),
        (r"server replica-b:8000;", f"server {upstreams[1]};"),
        (r"listen 8080;", f"listen 127.0.0.1:{port};"),
    ]
    for pattern, replacement in rewrites:
        conf, count = re.subn(re.escape(pattern), replacement, conf)
        assert count == 1, pattern
    conf, count = re.subn(r"/var/(cache|run)/nginx", str(workdir), conf)
    assert count == 6
    return conf


@pytest.mark.slow
def test_nginx_balances_requests_over_two_real_replicas(tmp_path: Path) -> None:
    nginx = require_binary("nginx", package="nginx")
    model = write_model(tmp_path / "model.onnx")
    replicas = [start_service(model, tmp_path / f"replica-{n}.log") for n in "ab"]
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        _nginx_for_test(
            NGINX_CONF.read_text(), [r.url.removeprefix("http://") for r in replicas], port, tmp_path
        )
    )
    check = subprocess.run(
        [nginx, "-t", "-c", str(conf), "-p", str(tmp_path), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    with (tmp_path / "nginx.log").open("wb") as log:
        lb = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(tmp_path), "-e", "stderr", "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for replica in replicas:
            wait_until(f"{replica.url}/readyz", replica.process)
        wait_until(f"{url}/readyz", lb)
        body = {
            "user_id": "u",
            "events": [{"timestamp": "1997-01-01T00:00:00Z", "amount": 1.0, "quantity": 1}],
        }
        answers = [httpx.post(f"{url}/predict", json=body, timeout=10) for _ in range(20)]
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["probability"] for a in answers}) == 1
        tagged = httpx.post(f"{url}/predict", json=body, headers={"X-Request-ID": "lb-test-1"}, timeout=10)
        assert tagged.headers["x-request-id"] == "lb-test-1"  # the client's id reaches a replica
        bad = httpx.post(f"{url}/predict", content=b"{", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400
        assert bad.json()["error"] == "invalid_json"  # the service's envelope, not an nginx page
        scored = []
        for replica in replicas:
            metrics = httpx.get(f"{replica.url}/metrics", timeout=10).text
            (line,) = (x for x in metrics.splitlines() if x.startswith("purchase_intent_users_scored_total "))
            scored.append(float(line.split()[1]))
        assert sum(scored) == 21
        assert min(scored) >= 5, f"one replica got almost nothing: {scored}"
        # one replica gone (a restart, a crash): its refused connections move to the other
        replicas[1].stop()
        after = [httpx.post(f"{url}/predict", json=body, timeout=10) for _ in range(10)]
        assert [a.status_code for a in after] == [200] * 10
    finally:
        lb.terminate()
        lb.wait(timeout=10)
        for replica in replicas:
            replica.stop()


def test_grafana_provisioning_parses_and_matches_the_dashboard() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "purchase-intent.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def _stage(dockerfile: str, name: str) -> str:
    match = re.search(rf"^FROM\s+\S+\s+AS\s+{name}\s*$(.*?)(?=^FROM\s|\Z)", dockerfile, flags=re.M | re.S)
    assert match, f"no stage {name}"
    return match.group(1)


def _healthcheck_command(stage: str) -> list[str]:
    match = re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD\s+(\[.*\])", stage)
    assert match, "no exec-form HEALTHCHECK"
    command: list[str] = json.loads(match.group(1))
    return command


def test_dockerfile_stages() -> None:
    text = DOCKERFILE.read_text()
    train = _stage(text, "train")
    assert re.search(r"pip install [^\n]*torch==2\.13\.0\b", train), "CPU torch pinned exactly"
    assert "pip install -r requirements.lock" in train
    assert "pip install -c requirements.lock '.[train]'" in train
    assert "python -m model_export train --data cdnow" in train
    for name in ("runtime", "runtime-gpu"):
        stage = _stage(text, name)
        assert re.search(r"^USER\s+(?!0\b|root\b)\S+", stage, flags=re.M), f"{name} runs as root"
        assert "/readyz" in " ".join(_healthcheck_command(stage))
        assert "torch" not in stage
        assert "[train]" not in stage
        assert 'CMD ["python", "-m", "service"]' in stage
        # the pinned dependencies, and nothing resolved again when the service goes in
        assert "pip install -r /tmp/requirements.lock" in stage, name
        assert "pip install --no-deps /wheels/*.whl" in stage, name
    assert 'onnxruntime-gpu==${ORT_GPU_VERSION}"' in _stage(text, "runtime-gpu")
    for source in re.findall(r"^COPY\s+(?!--from)(\S+)", text, flags=re.M):
        assert (ROOT / source).exists(), source
    assert text.rstrip().splitlines()[-1].startswith("FROM runtime AS"), "plain build must give the CPU image"


@pytest.mark.slow
def test_healthcheck_command_follows_readiness(tmp_path: Path) -> None:
    """The image's HEALTHCHECK, run for real: 0 against a ready server, non-zero otherwise."""
    command = _healthcheck_command(_stage(DOCKERFILE.read_text(), "runtime"))
    assert command[:2] == ["python", "-c"]
    model = write_model(tmp_path / "model.onnx")

    def healthcheck(port: str) -> int:
        env = {**os.environ, "PI_PORT": port}
        return subprocess.run(
            [sys.executable, "-c", command[2]], env=env, capture_output=True, timeout=10
        ).returncode

    ready = start_service(model, tmp_path / "ready.log")
    broken = start_service(
        tmp_path / "missing.onnx", tmp_path / "broken.log", env={"PI_EXIT_ON_LOAD_FAILURE": "false"}
    )
    try:
        wait_until(f"{ready.url}/readyz", ready.process)
        wait_until(f"{broken.url}/readyz", broken.process, status=503)
        assert healthcheck(ready.url.rsplit(":", 1)[1]) == 0
        assert healthcheck(broken.url.rsplit(":", 1)[1]) != 0
    finally:
        ready.stop()
        broken.stop()
    assert healthcheck(ready.url.rsplit(":", 1)[1]) != 0  # nothing listening


LOCK = ROOT / "requirements.lock"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;]*)", line.strip())
            assert match, f"not an exact pin: {line!r}"
            pins[_canonical(match.group(1))] = match.group(2)
    return pins


def test_the_lock_pins_the_whole_runtime_closure_and_nothing_of_training() -> None:
    """Every runtime dependency (with the `arrow` extra) and each of theirs is pinned exactly; no
    torch, no CUDA wheels."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    pins = _locked()
    assert not [p for p in pins if p in {"torch", "triton", "pandas"} or p.startswith("nvidia-")], pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the images answer Arrow bodies too: the `arrow` extra is part of what ships
    todo = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["arrow"]]]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = _canonical(requirement.name)
        if name in seen or (
            requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})
        ):
            continue
        seen.add(name)
        assert name in pins, f"{name} is a runtime dependency but not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
        try:
            todo.extend(Requirement(r) for r in distribution(name).requires or [])
        except PackageNotFoundError:
            pytest.fail(f"{name} is not installed: run make env")
    assert seen == set(pins), f"pinned but not needed at runtime: {sorted(set(pins) - seen)}"


def test_the_environment_runs_what_the_lock_pins() -> None:
    """make env installs from the lock: the versions the tests run on are the ones shipped."""
    from importlib.metadata import version

    drift = {name: (pin, version(name)) for name, pin in _locked().items() if version(name) != pin}
    assert not drift, f"installed versions differ from requirements.lock (run make env): {drift}"


def test_makefile_installs_torch_first_then_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    steps = [
        s
        for s in re.findall(r"^\t\$\(BIN\)/pip install[^\n]*", makefile, flags=re.M)
        if "--upgrade pip" not in s
    ]
    assert steps[:3] == [
        "\t$(BIN)/pip install --quiet torch==2.13.0",
        "\t$(BIN)/pip install --quiet -r requirements.lock",
        "\t$(BIN)/pip install --quiet -c requirements.lock -e '.[train]'",
    ], steps
    assert all(
        "-c requirements.lock" in step for step in steps[2:] if "-e '." in step and "[gpu]" not in step
    )
