"""Scoped tokens, rate limits and the audit trail, through the app factory (a fake predictor, a
real SQLite store): the authorization matrix is built from the app's own route table, so a route
added without a declared scope, or answering a scope it should refuse, fails here."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from pydantic import SecretStr, ValidationError
from starlette.routing import BaseRoute, Route
from starlette.testclient import TestClient

import service.auth as auth
from service.api.deps import Scoped
from service.app import create_app
from service.auth import Access, RateLimiter, TokenFile, TokenFileError, authenticate, parse_tokens
from service.config import Settings
from service.scopes import (
    ADMIN,
    INGEST,
    METRICS,
    PREDICT,
    PREDICT_STORED,
    PUBLIC,
    SCOPES,
    USERS_DELETE,
    USERS_READ,
)
from tests.service.conftest import wait_ready
from tests.service.test_events_api import AS_OF, HISTORY, all_channel_predictor

#: One token per scope, named after it; "all" holds every scope.
TOKENS = {scope: f"secret-{scope.replace(':', '-')}" for scope in SCOPES} | {"all": "secret-all"}
#: FastAPI's own documentation routes: public by design, declared here rather than on a route.
DOCS_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def token_line(name: str, token: str, scopes: list[str]) -> str:
    return f"{name.replace(':', '-')}:{hashlib.sha256(token.encode()).hexdigest()}:{','.join(scopes)}"


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    lines = [
        "# one per scope",
        *(token_line(n, t, [n] if n in SCOPES else list(SCOPES)) for n, t in tokens.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def make_app(tmp_path: Path, **overrides: Any) -> FastAPI:
    values: dict[str, Any] = {
        "providers": ("CPUExecutionProvider",),
        "store_path": tmp_path / "events.sqlite3",
        "tokens_file": write_tokens(tmp_path / "tokens", TOKENS),
        **overrides,
    }
    return create_app(Settings(**values), predictor=all_channel_predictor(), registry=CollectorRegistry())


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(make_app(tmp_path, metrics_require_token=True), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def flat_routes(
    routes: Sequence[BaseRoute], inherited: Sequence[Any] = ()
) -> Iterator[tuple[BaseRoute, list[Any]]]:
    """Every route with the dependencies it gets from ``include_router`` (FastAPI keeps included
    routers as entries of their own)."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            yield from flat_routes(original.routes, [*inherited, *route.include_context.dependencies])  # type: ignore[attr-defined]
        else:
            yield route, list(inherited)


def declared_scope(route: APIRoute, inherited: list[Any]) -> list[str]:
    calls = [d.dependency for d in inherited] + [d.call for d in route.dependant.dependencies]
    return [c.scope for c in calls if isinstance(c, Scoped)]


def routes(app: FastAPI) -> list[tuple[str, str, str]]:
    """(method, path, scope) for every route the app serves; fails on a route without one scope."""
    out = []
    for route, inherited in flat_routes(app.routes):
        if isinstance(route, APIRoute):
            scopes = declared_scope(route, inherited)
            assert len(scopes) == 1, f"{route.path} declares {scopes}: every route needs exactly one scope"
            path = re.sub(r"\{[^}]+\}", "u-1", route.path)
            out += [(m, path, scopes[0]) for m in sorted(route.methods or ())]
        else:
            assert isinstance(route, Route), f"{route} has no declared scope"
            assert route.path in DOCS_ROUTES, f"{route.path} has no declared scope"
    return out


def test_every_route_of_the_app_declares_one_scope(tmp_path: Path) -> None:
    table = routes(make_app(tmp_path))
    served = {(m, p) for m, p, _ in table}
    # the full app: admin and user-data routes are mounted when tokens are on
    for expected in (
        ("POST", "/predict"),
        ("POST", "/events"),
        ("DELETE", "/users/u-1"),
        ("POST", "/admin/reload"),
    ):
        assert expected in served
    # predict:stored is checked once the body says a user comes by id (the next test)
    assert {s for _, _, s in table} == {PUBLIC, *SCOPES} - {PREDICT_STORED}


def expected_status(route_scope: str, caller: str | None) -> str:
    """What the token check must answer: "open" (passes it), 401 or 403."""
    if route_scope == PUBLIC:
        return "open"
    if caller is None or caller == "bogus":
        return "401"
    if caller == "all" or caller == route_scope or (route_scope == PREDICT and caller == PREDICT_STORED):
        return "open"
    return "403"


def test_the_authorization_matrix_holds_for_every_route_and_scope(api: TestClient) -> None:
    table = routes(api.app)  # type: ignore[arg-type]
    callers: list[str | None] = [None, "bogus", *TOKENS]
    checked = 0
    for method, path, scope in table:
        for caller in callers:
            headers = {} if caller is None else {"Authorization": f"Bearer {TOKENS.get(caller, 'nope')}"}
            r = api.request(method, path, headers=headers)
            want = expected_status(scope, caller)
            where = f"{method} {path} ({scope}) as {caller}: {r.status_code} {r.text[:200]}"
            if want == "open":
                assert r.status_code not in (401, 403), where
            else:
                assert r.status_code == int(want), where
                body = r.json()
                assert body["error"] == ("unauthorized" if want == "401" else "forbidden"), where
                if want == "401":
                    assert r.headers["www-authenticate"] == "Bearer"
            checked += 1
    assert checked == len(table) * len(callers)


def test_a_by_id_score_needs_predict_stored_and_inline_needs_predict(api: TestClient) -> None:
    body = {"events": [{"user_id": "u-7", **e} for e in HISTORY]}
    assert api.post("/events", json=body, headers=bearer(INGEST)).status_code == 200
    by_id = {"user_id": "u-7", "as_of": AS_OF}
    inline = {"user_id": "u-7", "as_of": AS_OF, "events": HISTORY}
    for path, one, two in (
        ("/predict", by_id, inline),
        ("/predict/batch", {"users": [by_id]}, {"users": [inline]}),
    ):
        refused = api.post(path, json=one, headers=bearer(PREDICT))
        assert refused.status_code == 403, refused.text
        assert refused.json()["detail"][0]["message"] == "by user id needs 'predict:stored'"
        assert api.post(path, json=one, headers=bearer(PREDICT_STORED)).status_code == 200
        refused = api.post(path, json=two, headers=bearer(PREDICT_STORED))
        assert refused.status_code == 403, refused.text
        assert api.post(path, json=two, headers=bearer(PREDICT)).status_code == 200
    mixed = {"users": [by_id, inline]}
    assert api.post("/predict/batch", json=mixed, headers=bearer(PREDICT)).status_code == 403
    assert api.post("/predict/batch", json=mixed, headers=bearer(PREDICT_STORED)).status_code == 403
    assert api.post("/predict/batch", json=mixed, headers=bearer("all")).status_code == 200


def test_refusals_are_counted_and_the_metrics_scope_can_be_left_public(tmp_path: Path) -> None:
    with TestClient(make_app(tmp_path), raise_server_exceptions=False) as api:
        wait_ready(api)
        assert api.get("/metrics").status_code == 200  # public by default
        assert api.post("/events", json={"events": []}).status_code == 401
        assert (
            api.post("/events", json={"events": []}, headers={"Authorization": "Bearer x"}).status_code == 401
        )
        assert api.post("/events", json={"events": []}, headers=bearer(PREDICT)).status_code == 403
        text = api.get("/metrics").text
    for reason in ("missing", "invalid", "forbidden"):
        assert f'purchase_intent_auth_refused_total{{reason="{reason}"}} 1.0' in text
    assert 'purchase_intent_rejected_requests_total{reason="forbidden"} 1.0' in text


def test_the_tokens_file_is_parsed_strictly_naming_the_line() -> None:
    good = token_line("a", "t", [PREDICT, INGEST])
    assert parse_tokens(f"# c\n\n{good}\n")[0].scopes == {PREDICT, INGEST}
    digest = hashlib.sha256(b"t").hexdigest()
    for text, message in (
        ("a:b", "line 1: expected name:sha256-hex:scope,scope"),
        (f"a b:{digest}:predict", "line 1: the name must be"),
        ("a:abc:predict", "line 1: the hash must be 64 hex digits"),
        (f"a:{digest}:predict,root", "line 1: unknown scope(s) ['root']"),
        (f"{good}\n{good}", "line 2: the name 'a' is used twice"),
    ):
        with pytest.raises(TokenFileError, match=re.escape(message)):
            parse_tokens(text)


def test_tokens_are_found_by_hash_and_a_changed_file_is_reloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text(token_line("old", "one", [PREDICT]) + "\n")
    tokens = TokenFile(path, check_every=0.0)
    assert authenticate(tokens.tokens(), "one") is not None
    assert authenticate(tokens.tokens(), "two") is None
    path.write_text(token_line("new", "two", [PREDICT]) + "\n")  # rotation: a new file, no restart
    found = authenticate(tokens.tokens(), "two")
    assert found is not None
    assert found.name == "new"
    assert authenticate(tokens.tokens(), "one") is None
    path.write_text("broken\n")
    with caplog.at_level(logging.ERROR):
        assert authenticate(tokens.tokens(), "two") is not None  # the last good table stays
    assert "tokens file not reloaded" in caplog.text


def test_settings_refuse_two_sources_of_admin_and_unknown_rate_scopes(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exclusive"):
        Settings(tokens_file=tmp_path / "t", admin_token=SecretStr("x"))
    with pytest.raises(ValidationError, match="unknown scope"):
        Settings(rate_limits={"predict:all": 5})
    with pytest.raises(ValidationError, match="> 0"):
        Settings(rate_limits={PREDICT: 0})


def test_a_token_bucket_admits_its_rate_and_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("service.auth.time.monotonic", lambda: clock[0])
    limiter = RateLimiter({PREDICT: 10.0}, burst_seconds=0.5)  # 5 at once, then 10 a second
    assert [limiter.take("a", PREDICT, False) for _ in range(5)] == [0.0] * 5
    assert limiter.take("a", PREDICT, False) == pytest.approx(0.1)
    assert limiter.take("b", PREDICT, False) == 0.0  # another client has its own bucket
    admitted = 0
    for _ in range(1000):  # 10 s at 100 tries a second
        clock[0] += 0.01
        admitted += limiter.take("a", PREDICT, False) == 0.0
    assert admitted == 100


def test_address_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "MAX_ADDRESS_BUCKETS", 3)
    limiter = RateLimiter({PREDICT: 1.0}, burst_seconds=1.0)
    for i in range(10):
        limiter.take(f"addr:10.0.0.{i}", PREDICT, True)
    assert len(limiter._buckets) == 3


def test_over_the_rate_a_client_gets_a_429_with_retry_after_and_others_do_not(tmp_path: Path) -> None:
    app = make_app(tmp_path, rate_limits={PREDICT: 2.0, INGEST: 100.0}, rate_limit_burst_seconds=1.0)
    body = {"user_id": "u", "as_of": AS_OF, "events": HISTORY}
    with TestClient(app, raise_server_exceptions=False) as api:
        wait_ready(api)
        codes = [api.post("/predict", json=body, headers=bearer(PREDICT)).status_code for _ in range(4)]
        assert codes[:2] == [200, 200]
        assert codes[2:] == [429, 429]
        limited = api.post("/predict", json=body, headers=bearer(PREDICT))
        assert limited.json()["error"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        assert api.post("/predict", json=body, headers=bearer("all")).status_code == 200  # its own bucket
        assert api.get("/readyz").status_code == 200  # probes are never limited
        text = api.get("/metrics").text
    assert 'purchase_intent_rate_limited_total{scope="predict",token="predict"} 3.0' in text


def test_without_tokens_the_rate_limit_is_per_address_and_labelled_anonymous(tmp_path: Path) -> None:
    settings = Settings(
        providers=("CPUExecutionProvider",), store_path=tmp_path / "e.sqlite3", rate_limits={PREDICT: 1.0}
    )
    app = create_app(settings, predictor=all_channel_predictor(), registry=CollectorRegistry())
    body = {"user_id": "u", "as_of": AS_OF, "events": HISTORY}
    with TestClient(app, raise_server_exceptions=False) as api:
        wait_ready(api)
        assert [api.post("/predict", json=body).status_code for _ in range(2)] == [200, 429]
        text = api.get("/metrics").text
    assert 'purchase_intent_rate_limited_total{scope="predict",token="anonymous"} 1.0' in text
    assert "testclient" not in text  # never the address


def test_every_admin_and_user_data_call_is_audited_without_secrets(
    tmp_path: Path, api: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    assert (
        api.post(
            "/events",
            json={"events": [{"user_id": "alice@example.com", **HISTORY[0]}]},
            headers=bearer(INGEST),
        ).status_code
        == 200
    )
    with caplog.at_level(logging.INFO, logger="service.audit"):
        assert api.get("/users/alice@example.com/events", headers=bearer(USERS_READ)).status_code == 200
        assert api.delete("/users/alice@example.com", headers=bearer(USERS_READ)).status_code == 403
        assert api.delete("/users/alice@example.com").status_code == 401
        assert api.delete("/users/alice@example.com", headers=bearer(USERS_DELETE)).status_code == 200
        assert (
            api.post("/admin/reload", headers=bearer(ADMIN), json={"model_path": "/nope.onnx"}).status_code
            == 422
        )
        assert (
            api.post("/events", json={"events": []}, headers=bearer(INGEST)).status_code == 422
        )  # not audited
    lines = [r for r in caplog.records if r.name == "service.audit"]
    seen = [(r.token, r.scope, r.method, r.route, r.status) for r in lines]  # type: ignore[attr-defined]
    assert seen == [
        ("users-read", USERS_READ, "GET", "/users/{user_id:text}/events", 200),
        ("users-read", USERS_DELETE, "DELETE", "/users/{user_id:text}", 403),
        (None, USERS_DELETE, "DELETE", "/users/{user_id:text}", 401),
        ("users-delete", USERS_DELETE, "DELETE", "/users/{user_id:text}", 200),
        ("admin", ADMIN, "POST", "/admin/reload", 422),
    ]
    hashed = hashlib.sha256(b"alice@example.com").hexdigest()[:32]
    assert [r.user for r in lines[:4]] == [hashed] * 4  # type: ignore[attr-defined]
    everything = json.dumps([r.__dict__ for r in lines], default=str)
    assert "alice" not in everything
    assert not any(t in everything for t in TOKENS.values())
    text = api.get("/metrics", headers=bearer(METRICS)).text
    assert 'purchase_intent_audit_events_total{outcome="2xx",scope="users:delete"} 1.0' in text


def test_an_audit_key_makes_the_user_hash_keyed(tmp_path: Path) -> None:
    plain = Access(Settings(), CollectorRegistry())
    keyed = Access(Settings(audit_key=SecretStr("k")), CollectorRegistry())
    assert plain.hash_user("u") == hashlib.sha256(b"u").hexdigest()[:32]
    assert keyed.hash_user("u") != plain.hash_user("u")
    assert len(keyed.hash_user("u")) == 32


def test_the_scope_follows_a_request_into_its_worker_thread(tmp_path: Path) -> None:
    # every body is "large": parsed, read and scored in a worker thread, which inherits the caller
    app = make_app(tmp_path, inline_max_body_bytes=1)
    with TestClient(app, raise_server_exceptions=False) as api:
        wait_ready(api)
        body = {"events": [{"user_id": "u-7", **e} for e in HISTORY]}
        assert api.post("/events", json=body, headers=bearer(INGEST)).status_code == 200
        by_id = {"user_id": "u-7", "as_of": AS_OF}
        assert api.post("/predict", json=by_id, headers=bearer(PREDICT)).status_code == 403
        assert api.post("/predict", json=by_id, headers=bearer(PREDICT_STORED)).status_code == 200
        assert api.post("/predict/batch", json={"users": [by_id]}, headers=bearer(PREDICT)).status_code == 403
