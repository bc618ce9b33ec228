"""Fuzzing the contract: schemathesis drives a real server from the server's own /openapi.json.

Every operation gets schemathesis's coverage cases (boundary values, missing parts, undeclared
methods: a fixed list) and schema-valid and schema-violating requests from hypothesis; the
schema's links are followed as chains (events stored, read, erased, read again). All draws are
bounded and seeded through ``derandomize``, so CI sends the same requests every time. Every check
schemathesis has judges every answer: not a 5xx; status code, content type, headers and body as
documented; a schema-valid request accepted, a schema-violating one refused; 405 for an
undeclared method; auth enforced where declared; an erased user gone. No answer may carry a
traceback or a server path.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.core.result import Ok

from service.scopes import SCOPES
from tests.service.fakes import make_metadata
from tests.service.onnx_models import write_model
from tests.service.processes import ServiceProcess, running_service

pytestmark = pytest.mark.slow

TOKEN = "fuzz-token"
MAX_USERS = 16
MAX_EVENTS = 64
EXAMPLES = 120  # per POST operation and generation mode; with the rest, ~1,900 requests in all
SENT: Counter[str] = Counter()

checks.load_all_checks()
#: Every check schemathesis has. Two have nothing to judge here, and run anyway:
#: ``ensure_resource_availability`` reads back what a POST created below its own path (``POST
#: /users`` then ``GET /users/{id}``), a shape this API does not have, and
#: ``object_level_authorization`` compares what two configured identities can read (there is one,
#: the admin token).
CHECKS = [check for check in checks.CHECKS.get_all() if not checks.is_check_class(check)]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Arrow bodies of ``/predict/batch`` are bytes to JSON Schema (``format: binary``), which
#: schemathesis cannot draw as a stream; tests/service/test_bulk.py covers them.
ARROW = "application/vnd.apache.arrow.stream"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served model; a shadow and a canary candidate beside it (``_candidate``)."""
    served = write_model(tmp_path_factory.mktemp("model") / "model.onnx")
    for role in ("shadow", "canary"):
        write_model(_candidate(served, role), metadata=make_metadata(version=f"fuzz-{role}"), bias=0.2)
    return served


def _candidate(model: Path, role: str) -> Path:
    return model.with_name(f"{role}.onnx")


@pytest.fixture(scope="module", params=["admin-token", "scoped-tokens"])
def server(
    tmp_path_factory: pytest.TempPathFactory, model: Path, request: pytest.FixtureRequest
) -> Iterator[ServiceProcess]:
    """Fuzzed twice: tokens off (the admin token guards the admin and user-data routes) and on
    (``PI_TOKENS_FILE``: every operation but the probes declares bearer security, which
    schemathesis's ``ignored_auth`` check then holds it to)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {
        "PI_MAX_BATCH_USERS": str(MAX_USERS),
        "PI_MAX_EVENTS_PER_USER": str(MAX_EVENTS),
        "PI_SHADOW_MODEL": str(_candidate(model, "shadow")),
        "PI_CANARY_MODEL": str(_candidate(model, "canary")),
    }
    if request.param == "admin-token":
        env["PI_ADMIN_TOKEN"] = TOKEN
    else:
        tokens = tmp / "tokens"
        tokens.write_text(f"fuzz:{hashlib.sha256(TOKEN.encode()).hexdigest()}:{','.join(SCOPES)}\n")
        env |= {"PI_TOKENS_FILE": str(tokens), "PI_METRICS_REQUIRE_TOKEN": "true"}
    with running_service(model, tmp / "service.log", env=env) as proc:
        yield proc
    print(f"fuzzed: {sum(SENT.values())} requests, by status {dict(sorted(SENT.items()))}")


#: What may answer a schema-violating request: schemathesis's list, and 413, the documented
#: refusal of more users than ``maxItems`` (a batch too large to take) on ``/predict/batch``.
REFUSALS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
#: A schema-valid V2 inference request names tensors, datatypes and shapes that JSON Schema cannot
#: tie to the model's inputs (names, datatypes, element count = product of the shape): those are
#: documented 4xx answers (400, 413, 422), which the positive check must accept there.
V2_INFER = ["/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"]
CONFIG = {
    "operations": [
        {
            "include-path": "/predict/batch",
            "checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}},
        },
        *(
            {
                "include-path": path,
                "checks": {
                    "negative_data_rejection": {"expected-statuses": REFUSALS},
                    "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "413", "422"]},
                },
            }
            for path in V2_INFER
        ),
    ]
}


@pytest.fixture(scope="module")
def api_schema(server: ServiceProcess) -> schemathesis.BaseSchema:
    # an explicit config: no schemathesis.toml found on the way changes what is checked
    config = schemathesis.Config.from_dict(CONFIG)
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


#: Every operation in the schema (a test below keeps this list complete); POST bodies are also
#: fuzzed with schema-violating data. schemathesis's pytest plugin is not used: its lazy fixture
#: loader reads a pytest-internal attribute that pytest 9 removed, so the strategies are driven
#: by hypothesis directly.
OPERATIONS = [
    ("POST", "/predict", GenerationMode.POSITIVE),
    ("POST", "/predict", GenerationMode.NEGATIVE),
    ("POST", "/predict/batch", GenerationMode.POSITIVE),
    ("POST", "/predict/batch", GenerationMode.NEGATIVE),
    ("POST", "/admin/reload", GenerationMode.POSITIVE),
    ("POST", "/admin/reload", GenerationMode.NEGATIVE),
    ("PUT", "/admin/models/shadow", GenerationMode.POSITIVE),
    ("PUT", "/admin/models/shadow", GenerationMode.NEGATIVE),
    ("PUT", "/admin/models/canary", GenerationMode.POSITIVE),
    ("PUT", "/admin/models/canary", GenerationMode.NEGATIVE),
    ("POST", "/admin/models/canary/promote", GenerationMode.POSITIVE),
    ("DELETE", "/admin/models/shadow", GenerationMode.POSITIVE),
    ("DELETE", "/admin/models/canary", GenerationMode.POSITIVE),
    ("POST", "/events", GenerationMode.POSITIVE),
    ("POST", "/events", GenerationMode.NEGATIVE),
    ("GET", "/users/{user_id}/events", GenerationMode.POSITIVE),
    ("DELETE", "/users/{user_id}", GenerationMode.POSITIVE),
    ("GET", "/healthz", GenerationMode.POSITIVE),
    ("GET", "/readyz", GenerationMode.POSITIVE),
    ("GET", "/v1/model", GenerationMode.POSITIVE),
    ("GET", "/v1/model/performance", GenerationMode.POSITIVE),
    ("GET", "/v1/model/performance", GenerationMode.NEGATIVE),
    ("GET", "/metrics", GenerationMode.POSITIVE),
    ("GET", "/v2", GenerationMode.POSITIVE),
    ("GET", "/v2/health/live", GenerationMode.POSITIVE),
    ("GET", "/v2/health/ready", GenerationMode.POSITIVE),
    ("GET", "/v2/models/{name}", GenerationMode.POSITIVE),
    ("GET", "/v2/models/{name}", GenerationMode.NEGATIVE),
    ("GET", "/v2/models/{name}/versions/{version}", GenerationMode.POSITIVE),
    ("GET", "/v2/models/{name}/ready", GenerationMode.POSITIVE),
    ("GET", "/v2/models/{name}/versions/{version}/ready", GenerationMode.POSITIVE),
    *(("POST", path, mode) for path in V2_INFER for mode in GenerationMode),
]
ROUTES = list(dict.fromkeys((method, path) for method, path, _ in OPERATIONS))


def _columns_agree(columns: dict[str, Any]) -> None:
    """The columnar rule JSON Schema cannot state (``ColumnarEvents``' description, a documented
    422): event lists equally long, ``as_of`` one per user, ``offsets`` n_users + 1 non-decreasing
    positions from 0 to the events' length, at most MAX_EVENTS per user. The drawn lists are cut to
    agree and the drawn offsets kept where they fit; every value stays what hypothesis drew."""
    users = len(columns["user_id"])
    n = min(len(columns["timestamp"]), len(columns["amount"]), len(columns["quantity"]), users * MAX_EVENTS)
    for name in ("timestamp", "amount", "quantity"):
        columns[name] = columns[name][:n]
    inner = sorted(min(int(o), n) for o in columns["offsets"])[: users - 1]
    offsets = [0, *inner, *[n] * (users - 1 - len(inner)), n]
    if any(b - a > MAX_EVENTS for a, b in itertools.pairwise(offsets)):
        offsets = [n * i // users for i in range(users + 1)]  # at most ceil(n / users) each
    columns["offsets"] = offsets
    if columns.get("as_of") is not None:
        columns["as_of"] = [*columns["as_of"], *[None] * users][:users]


def _within_documented_rules(
    case: schemathesis.Case[Any], model: Path, server: ServiceProcess
) -> schemathesis.Case[Any]:
    """A schema-valid request that also meets what a schema cannot say, so that a refusal of it is
    a broken promise: lists that agree in length, and a model file that exists on the server (a
    missing one is a documented 422 ``model_rejected``; test_admin.py covers it) and, for a shadow
    or canary, is not loaded in another role (a promoted canary is the served model: the canary is
    then the first served model's file)."""
    if case.method.upper() == "PUT" and case.path in ("/admin/models/shadow", "/admin/models/canary"):
        role = case.path.rsplit("/", 1)[1]
        path = _candidate(model, role)
        if role == "canary":
            served = httpx.get(f"{server.url}/v1/model", headers=AUTH, timeout=10).json()["model_version"]
            path = model if served == "fuzz-canary" else path
        given: dict[str, Any] = case.body if isinstance(case.body, dict) else {}
        case.body = {**given, "model_path": str(path)}
        return case
    body = case.body
    if not isinstance(body, dict):
        return case
    drawn = body.get("columns")
    if case.path == "/predict/batch" and isinstance(drawn, dict):
        columns = dict(drawn)
        _columns_agree(columns)
        case.body = {**body, "columns": columns}
    elif case.path == "/admin/reload" and body.get("model_path") is not None:
        case.body = {**body, "model_path": str(model)}
    return case


def _record(response: schemathesis.Response, server: ServiceProcess) -> None:
    SENT[str(response.status_code)] += 1
    text = response.text
    assert "Traceback" not in text
    assert 'File "' not in text
    assert str(server.log.parent) not in text


def _call(case: schemathesis.Case[Any], server: ServiceProcess) -> None:
    _record(case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS, timeout=30), server)


def test_every_operation_is_fuzzed(api_schema: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations() if isinstance(result, Ok)]
    published = {(op.method.upper(), op.path) for op in operations}
    assert published == set(ROUTES)


def test_every_check_runs() -> None:
    assert {check.__name__ for check in CHECKS} == set(checks.CHECKS.get_all_names())


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=lambda v: str(v))
def test_coverage_cases_keep_the_contract(
    api_schema: schemathesis.BaseSchema, server: ServiceProcess, model: Path, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    cases = api_schema.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=api_schema.config.generation_for(operation=operation, phase="coverage"),
    )
    for case in cases:
        if case.media_type == ARROW:
            continue
        meta = case.meta
        if meta is not None and meta.generation.mode.is_positive:
            _within_documented_rules(case, model, server)
        _call(case, server)


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS, ids=lambda v: str(v))
def test_no_request_breaks_the_contract(
    api_schema: schemathesis.BaseSchema,
    server: ServiceProcess,
    model: Path,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)
    if mode.is_positive:
        strategy = strategy.map(lambda case: _within_documented_rules(case, model, server))

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the fixed seed: the same requests on every run
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: schemathesis.Case[Any]) -> None:
        _call(case, server)

    run()


def test_linked_requests_keep_the_contract(
    api_schema: schemathesis.BaseSchema, server: ServiceProcess
) -> None:
    """Chains along the schema's links (``POST /events`` -> read -> erase -> read): each answer
    judged like any other, and, by ``use_after_free``, a read after an erasure a 404."""
    kwargs = {"base_url": server.url, "headers": AUTH, "timeout": 30}

    class Chains(api_schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, Any]:
            return kwargs

        def validate_response(
            self,
            response: schemathesis.Response,
            case: schemathesis.Case[Any],
            additional_checks: list[schemathesis.CheckFunction] | None = None,
            **transport: Any,
        ) -> None:
            _record(response, server)
            case.validate_response(
                response, checks=CHECKS, transport_kwargs=transport, recorder=self.recorder
            )

    Chains.run(
        settings=settings(
            max_examples=30,  # chains of up to 6 requests: ~200 requests
            stateful_step_count=6,
            derandomize=True,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
    )
