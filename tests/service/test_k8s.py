"""The Kubernetes manifests (deploy/k8s), validated with no cluster and no network.

``kubectl kustomize`` renders each overlay; ``kubernetes-validate`` checks every object strictly
against the schemas of the oldest and newest Kubernetes the manifests target; the ServiceMonitor is
checked against prometheus-operator's CRD schema; checkov finds no failed policy that the manifests
do not explain in a skip annotation. The probes, ports and ``PI_*`` variables are checked against
the service's own settings and routes, so renaming either side fails here.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.config import Settings
from service.errors import REJECT_REASONS
from service.metrics import Metrics
from tests import waiting
from tests.service.onnx_models import write_model
from tests.service.processes import free_port, require_binary, start_service, wait_until

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("single", "replicas")
#: The oldest Kubernetes the manifests target (the preStop sleep action is on by default from
#: 1.30) and the newest schema kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CRD_CHECK = K8S / "crd-check"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
PREFIX = str(Settings.model_config.get("env_prefix"))

Obj = dict[str, Any]


def _missing(message: str) -> None:
    """A tool ``make env`` installs is absent: fail in CI (CI=true), skip with the reason locally."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@cache
def _render(overlay: str) -> tuple[Obj, ...]:
    kubectl = require_binary("kubectl", package="kubectl")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def _one(objects: tuple[Obj, ...], kind: str) -> Obj:
    (found,) = (o for o in objects if o["kind"] == kind)
    return found


def _api_service(objects: tuple[Obj, ...]) -> Obj:
    (found,) = (o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "purchase-intent")
    return found


def _container(objects: tuple[Obj, ...], name: str = "service") -> Obj:
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = (c for c in pod["containers"] if c["name"] == name)
    found: Obj = container
    return found


def _env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container["env"]}


def _cpu_cores(quantity: str) -> int:
    """A CPU quantity as the downward API gives it with divisor 1: whole cores, rounded up."""
    return math.ceil(int(quantity[:-1]) / 1000) if quantity.endswith("m") else math.ceil(float(quantity))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_every_object_in_the_namespace(overlay: str) -> None:
    objects = _render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"} <= kinds
    assert "NetworkPolicy" in kinds
    namespace = _one(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, (obj["kind"], obj["metadata"]["name"])


def test_single_overlay_is_one_replica_on_sqlite_on_a_claim() -> None:
    objects = _render("single")
    deployment = _one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # two pods would share one SQLite file on a ReadWriteOnce claim during a rolling update
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    kinds = {o["kind"] for o in objects}
    assert "HorizontalPodAutoscaler" not in kinds
    assert "StatefulSet" not in kinds
    env = _env(_container(objects))
    assert env[f"{PREFIX}STORE_BACKEND"]["value"] == "sqlite"
    store_dir = str(Path(env[f"{PREFIX}STORE_PATH"]["value"]).parent)
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = (m for m in _container(objects)["volumeMounts"] if m["mountPath"] == store_dir)
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    assert set(volume) == {"name", "persistentVolumeClaim"}
    claim = _one(objects, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_replicas_overlay_runs_at_least_two_on_a_durable_redis() -> None:
    objects = _render("replicas")
    assert _one(objects, "Deployment")["spec"]["replicas"] >= 2
    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    redis = _one(objects, "StatefulSet")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync always" in command
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in container["volumeMounts"]
    }
    env = _env(_container(objects))
    assert env[f"{PREFIX}STORE_BACKEND"]["value"] == "redis"
    url = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", env[f"{PREFIX}REDIS_URL"]["value"])
    assert url, env[f"{PREFIX}REDIS_URL"]
    (service,) = (o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == url.group(1))
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert int(url.group(2)) in {p["port"] for p in service["spec"]["ports"]}
    assert service["metadata"]["name"] == redis["spec"]["serviceName"]
    # the same Redis, run the same way, as the compose file's replicas profile
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]
    assert container["image"] == compose["image"]
    assert " ".join(compose["command"][1:]) in command


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_kubernetes_validate_strictly(overlay: str, version: str) -> None:
    checked = 0
    for obj in _render(overlay):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: its own schema, below
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {version}: {exc.message} at {exc.path}")
        checked += 1
    assert checked >= 6


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The check above can fail: a field Kubernetes does not know is an error, not a warning."""
    deployment = json.loads(json.dumps(_one(_render("single"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def _check_service_monitors(monitors: list[Obj]) -> subprocess.CompletedProcess[str]:
    node = require_binary("node", package="nodejs")
    if not (CRD_CHECK / "node_modules").is_dir():
        _missing(f"{CRD_CHECK}/node_modules is missing: run make env (npm ci in {CRD_CHECK})")
    return subprocess.run(
        [node, str(CRD_CHECK / "validate.cjs")],
        input=json.dumps(monitors),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=CRD_CHECK,
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_matches_the_prometheus_operator_schema_and_the_service(overlay: str) -> None:
    objects = _render(overlay)
    monitor = _one(objects, "ServiceMonitor")
    proc = _check_service_monitors([monitor])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout) == {"name": monitor["metadata"]["name"], "errors": []}
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["interval"] = "fifteen seconds"
    assert _check_service_monitors([broken]).returncode == 1  # the schema check can fail
    service = _api_service(objects)
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] in _get_routes()


def test_checkov_reports_no_failure_that_is_not_explained(tmp_path: Path) -> None:
    if not CHECKOV.is_file():
        _missing(f"{CHECKOV} is missing: run make env (checkov lives in its own venv)")
    files = []
    for overlay in OVERLAYS:
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(_render(overlay)))
        files += ["-f", str(path)]
    proc = subprocess.run(
        # --skip-download: no call to the vendor's platform for guidelines; the checks are local
        [str(CHECKOV), *files, "--framework", "kubernetes", "--skip-download", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(proc.stdout)
    results = report["results"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert len(results["passed_checks"]) > 100
    for check in results["skipped_checks"]:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"


@cache
def _get_routes() -> frozenset[str]:
    """The paths the app answers GET on, from its own OpenAPI document (the probes are in it)."""
    spec = create_app(Settings()).openapi()
    return frozenset(path for path, operations in spec["paths"].items() if "get" in operations)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_settings_are_the_service_s(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = _render(overlay)
    container = _container(objects)
    env = _env(container)
    unknown = [n for n in env if n.removeprefix(PREFIX).lower() not in Settings.model_fields]
    assert not unknown, f"not settings of the service: {unknown}"
    assert all(n.startswith(PREFIX) for n in env), sorted(env)
    cpu_limit = _cpu_cores(container["resources"]["limits"]["cpu"])
    # a worker process per core of this container's CPU limit, through the downward API
    source = env[PREFIX + "WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert source["resource"] == "limits.cpu"
    assert source["containerName"] == container["name"]
    assert source.get("divisor", "1") == "1"
    # what the process will read: every value parses as the setting it names
    for name, var in env.items():
        monkeypatch.setenv(name, var["value"] if "value" in var else str(cpu_limit))
    settings = Settings()
    assert settings.workers == cpu_limit
    assert settings.intra_op_threads * settings.workers <= cpu_limit
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port
    assert settings.host == "0.0.0.0"
    routes = _get_routes()
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for kind, probe in probes.items():
        assert probe["path"] in routes, kind
        assert ports[probe["port"]] == settings.port, kind
    # shutdown: the preStop sleep, then the service's whole grace period, fit before SIGKILL
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep > 0
    assert settings.shutdown_drain_seconds < settings.shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] > sleep + settings.shutdown_grace_seconds
    service = _api_service(objects)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= _pod_labels(objects).items()


def _pod_labels(objects: tuple[Obj, ...]) -> dict[str, str]:
    labels: dict[str, str] = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_on_a_read_only_root(overlay: str) -> None:
    objects = _render(overlay)
    workloads = [o for o in objects if o["kind"] in {"Deployment", "StatefulSet"}]
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 10000
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in _container(objects)["volumeMounts"]}
    assert "/tmp" in mounts
    (tmp,) = (v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp


def test_the_model_is_the_one_baked_into_the_image() -> None:
    """No model volume: the image carries the model (Dockerfile), so a tag is one model."""
    env = _env(_container(_render("single")))
    dockerfile = (ROOT / "Dockerfile").read_text()
    model_path = env[f"{PREFIX}MODEL_PATH"]["value"]
    assert f"PI_MODEL_PATH={model_path}" in dockerfile
    assert re.search(rf"^COPY --from=train \S+ {re.escape(model_path)}$", dockerfile, flags=re.M)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "purchase-intent", "newTag": version}]
    assert _container(_render("single"))["image"] == f"purchase-intent:{version}"


def test_the_autoscaler_reads_a_metric_the_service_exports(tmp_path: Path) -> None:
    """HPA → prometheus-adapter rule → the service's in-flight gauge, with CPU beside it."""
    hpa = _one(_render("replicas"), "HorizontalPodAutoscaler")
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    pods = by_type["Pods"]["pods"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == pods["metric"]["name"]
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
    assert series
    registry = CollectorRegistry()
    Metrics(registry, latency_buckets=(0.1,), reject_reasons=REJECT_REASONS, process_metrics=False)
    gauges = {f.name for f in registry.collect() if f.type == "gauge"}
    assert series.group(0) in gauges
    assert re.fullmatch(rule["name"]["matches"], series.group(0))
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # a pod sheds with 503 at the concurrency limit: scale before that
    assert float(pods["target"]["averageValue"]) < Settings().max_concurrent_requests
    # the query the adapter will run is valid PromQL
    promtool = require_binary("promtool")
    query = rule["metricsQuery"].replace("<<.Series>>", series.group(0))
    query = query.replace("<<.LabelMatchers>>", 'namespace="purchase-intent",pod=~"purchase-intent-.*"')
    rules = tmp_path / "adapter.yml"
    rules.write_text(
        yaml.safe_dump({"groups": [{"name": "adapter", "rules": [{"record": "r", "expr": query}]}]})
    )
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_tools_the_tests_need_are_installed_by_make() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "checkov==" in makefile
    assert re.search(r"npm ci --prefix \$\(CRD_CHECK\)", makefile)
    deps = (ROOT / "scripts" / "system-deps.sh").read_text()
    for tool in ("kubectl", "nodejs", "nginx", "chromium"):
        assert f"missing+=({tool})" in deps, tool


@pytest.mark.slow
def test_a_service_with_the_manifest_s_settings_answers_its_probes_and_stops_in_time(tmp_path: Path) -> None:
    """``python -m service`` with the single overlay's environment (only the address, the model
    file and the store's directory moved to this machine): each probe answers 200, and on SIGTERM
    readiness fails at once and the process is gone before the pod's grace period would end."""
    objects = _render("single")
    container = _container(objects)
    cpu_limit = _cpu_cores(container["resources"]["limits"]["cpu"])
    env = {n: v.get("value", str(cpu_limit)) for n, v in _env(container).items()}
    env[f"{PREFIX}STORE_PATH"] = str(tmp_path / "events.sqlite3")
    server = start_service(write_model(tmp_path / "model.onnx"), tmp_path / "service.log", env=env)
    try:
        wait_until(f"{server.url}/readyz", server.process)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = container[kind]["httpGet"]["path"]
            assert httpx.get(server.url + path, timeout=5).status_code == 200, kind
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
        server.process.wait(timeout=60)
        stopped = time.monotonic() - sent
    finally:
        server.stop()
    grace = _one(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert stopped < grace - sleep


@pytest.mark.slow
def test_the_redis_command_starts_a_real_redis_that_fsyncs_every_write(tmp_path: Path) -> None:
    """The StatefulSet's command, as written, run by Debian's redis-server (data in a temporary
    directory, on a free loopback port)."""
    import redis

    binary = require_binary("redis-server", package="redis-server")
    (container,) = _one(_render("replicas"), "StatefulSet")["spec"]["template"]["spec"]["containers"]
    command = list(container["command"])
    assert command[0] == "redis-server"
    command[command.index("--dir") + 1] = str(tmp_path)
    port = free_port()
    with (tmp_path / "redis.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, *command[1:], "--port", str(port), "--bind", "127.0.0.1"], stdout=log, stderr=log
        )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        waiting.wait_until(lambda: _pings(client), timeout=15, message="redis-server did not answer")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("dir") == {"dir": str(tmp_path)}
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


def _pings(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
