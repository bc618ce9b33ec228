"""Who is calling and what they may do: scoped bearer tokens, per-client rate limits, the audit trail.

Every route declares one scope (``service/api/deps.py``: ``scoped``, which calls
:meth:`Access.identify` then :meth:`Access.authorize`; the direct ``/predict`` route calls the
same ``check_scope`` itself). With ``PI_TOKENS_FILE`` set, a request must carry a bearer
token from that file holding the route's scope: 401 without a valid token, 403 with one that
lacks the scope. Without it (the quick start), the data plane is open and the admin and user-data
routes take ``PI_ADMIN_TOKEN``, as before tokens existed.

The file holds ``name:sha256-hex-of-token:scope,scope`` lines: hashes, so neither the file nor
the environment ever holds a token. It is re-read when it changes (checked at most once a
second), so tokens rotate without a restart; a file that no longer parses is logged and the
previous table kept, rather than locking everyone out.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from service.config import Settings
from service.errors import ErrorDetail, ForbiddenError, RateLimitedError, UnauthorizedError
from service.metrics import PREFIX
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

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("service.audit")

#: Calls that leave an audit line: the admin API and the routes that read or delete a user's data.
AUDITED = frozenset({ADMIN, USERS_READ, USERS_DELETE})
#: What an anonymous caller may do while tokens are off: the data plane, as before tokens existed.
OPEN_SCOPES = frozenset({PREDICT, PREDICT_STORED, INGEST, METRICS})

ANONYMOUS = "anonymous"  # the metrics' token label while tokens are off
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{64}")
#: Most addresses with a rate-limit bucket while tokens are off; the least recently seen go first.
MAX_ADDRESS_BUCKETS = 10_000


@dataclass(frozen=True)
class Principal:
    name: str  # the token's name (logs, metrics), or ANONYMOUS
    scopes: frozenset[str]


#: The caller of the request being handled, for checks made after the body is parsed (a by-id user
#: needs ``predict:stored``); worker threads started with anyio inherit it.
current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes  # sha256 of the token
    scopes: frozenset[str]


class TokenFileError(ValueError):
    pass


def parse_tokens(text: str, source: str = "tokens file") -> tuple[Token, ...]:
    """``name:sha256-hex:scope,scope`` lines; blank lines and ``#`` comments are skipped."""
    tokens: list[Token] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        where = f"{source}, line {number}"
        if len(parts) != 3:
            raise TokenFileError(f"{where}: expected name:sha256-hex:scope,scope")
        name, digest, scope_list = (p.strip() for p in parts)
        if not _NAME.fullmatch(name):
            raise TokenFileError(f"{where}: the name must be 1-64 of A-Z a-z 0-9 _ . -")
        if name in names:
            raise TokenFileError(f"{where}: the name {name!r} is used twice")
        if not _HEX.fullmatch(digest.lower()):
            raise TokenFileError(f"{where}: the hash must be 64 hex digits (sha256 of the token)")
        scopes = frozenset(s.strip() for s in scope_list.split(",") if s.strip())
        unknown = sorted(scopes - set(SCOPES))
        if unknown or not scopes:
            raise TokenFileError(f"{where}: unknown scope(s) {unknown}; known: {', '.join(SCOPES)}")
        names.add(name)
        tokens.append(Token(name, bytes.fromhex(digest.lower()), scopes))
    return tuple(tokens)


def hash_token(token: str) -> str:
    """The file's form of a token (``python -m service hash-token`` prints it)."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenFile:
    """The tokens file, re-read when its size, inode or modification time change."""

    def __init__(self, path: Path, *, check_every: float = 1.0) -> None:
        self.path = path
        self._check_every = check_every
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._tokens = parse_tokens(path.read_text(), str(path))  # a bad file at start is fatal
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def tokens(self) -> tuple[Token, ...]:
        now = time.monotonic()
        if now - self._checked < self._check_every:
            return self._tokens
        with self._lock:
            self._checked = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._tokens = parse_tokens(self.path.read_text(), str(self.path))
                    self._stamp = stamp
                    logger.info("tokens file reloaded", extra={"tokens": len(self._tokens)})
            except (OSError, TokenFileError) as exc:  # keep serving with the last good table
                logger.error("tokens file not reloaded; the previous tokens stay", extra={"cause": str(exc)})
        return self._tokens


def authenticate(tokens: Sequence[Token], presented: str) -> Token | None:
    """The token whose hash matches, comparing with every configured hash in constant time, so the
    time taken tells neither which token nor how much of one matched."""
    digest = hashlib.sha256(presented.encode()).digest()
    found = None
    for token in tokens:
        if hmac.compare_digest(digest, token.digest):
            found = token
    return found


class RateLimiter:
    """A token bucket per (client, scope): ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rates: dict[str, float], burst_seconds: float) -> None:
        self._limits = {scope: (rate, max(1.0, rate * burst_seconds)) for scope, rate in rates.items()}
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def limited(self, scope: str) -> bool:
        return scope in self._limits

    def take(self, client: str, scope: str, bounded: bool) -> float:
        """0 if the request may go, else the seconds until it could. ``bounded``: the client is an
        address, not a configured token, so buckets are capped in number (least recent dropped)."""
        rate, burst = self._limits[scope]
        key = (client, scope)
        now = time.monotonic()
        with self._lock:
            level, stamp = self._buckets.get(key, (burst, now))
            level = min(burst, level + (now - stamp) * rate)
            wait = 0.0 if level >= 1.0 else (1.0 - level) / rate
            self._buckets[key] = (level - 1.0 if wait == 0.0 else level, now)
            if bounded:
                self._buckets.move_to_end(key)
                while len(self._buckets) > MAX_ADDRESS_BUCKETS:
                    self._buckets.popitem(last=False)
        return wait


class Access:
    """The check every route makes; see the module docstring."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.token_file = TokenFile(settings.tokens_file) if settings.tokens_file is not None else None
        self.enabled = self.token_file is not None
        self._metrics_public = not settings.metrics_require_token
        admin = settings.admin_token
        self._admin = None if admin is None else hashlib.sha256(admin.get_secret_value().encode()).digest()
        self.rates = RateLimiter(settings.rate_limits, settings.rate_limit_burst_seconds)
        key = settings.audit_key
        self._audit_key = None if key is None else key.get_secret_value().encode()
        p = PREFIX
        self.refused = Counter(
            f"{p}_auth_refused",
            "Requests refused by the token check: missing (no bearer token), invalid (not a "
            "configured token), forbidden (the token lacks the route's scope).",
            ["reason"],
            registry=registry,
        )
        self.rate_limited = Counter(
            f"{p}_rate_limited",
            "Requests answered 429 by the per-client rate limit, by token name (anonymous while "
            "tokens are off) and scope.",
            ["token", "scope"],
            registry=registry,
        )
        self.audited = Counter(
            f"{p}_audit_events",
            "Admin and user-data calls written to the audit log, by scope and outcome (the status class).",
            ["scope", "outcome"],
            registry=registry,
        )
        for reason in ("missing", "invalid", "forbidden"):
            self.refused.labels(reason)

    def requires(self, scope: str) -> str:
        """The scope a route declared, as this configuration enforces it."""
        return PUBLIC if scope == METRICS and self._metrics_public else scope

    def identify(self, headers: Iterable[tuple[bytes, bytes]], scope: str) -> Principal:
        """The caller of a request to a route of ``scope``, or the 401 to answer."""
        if scope == PUBLIC:
            return Principal(ANONYMOUS, frozenset())
        return self._principal(_bearer(headers), scope)

    def authorize(
        self, principal: Principal, scope: str, client: str | None, also: frozenset[str] = frozenset()
    ) -> None:
        """The 403 or 429 to answer, if any; then ``principal`` is the request's :data:`current`.
        ``also``: scopes that let the request in as well (``predict:stored`` on the routes that
        score by id; what the body then asks for is checked once it is parsed)."""
        if scope == PUBLIC:
            return
        if scope not in principal.scopes and not also & principal.scopes:
            self.refused.labels("forbidden").inc()
            raise ForbiddenError(
                f"the token {principal.name!r} lacks the scope this route needs",
                [ErrorDetail(field="authorization", type="missing_scope", message=f"needs {scope!r}")],
            )
        if self.rates.limited(scope):
            key = principal.name if self.enabled or principal.name != ANONYMOUS else f"addr:{client}"
            wait = self.rates.take(key, scope, bounded=key.startswith("addr:"))
            if wait:
                self.rate_limited.labels(principal.name, scope).inc()
                raise RateLimitedError(
                    f"rate limit for {scope!r} exceeded; retry after Retry-After seconds",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        current.set(principal)

    def _principal(self, presented: str | None, scope: str) -> Principal:
        if self.token_file is not None:
            if presented is None:
                raise self._unauthorized(
                    "missing", "a bearer token is required: Authorization: Bearer <token>"
                )
            token = authenticate(self.token_file.tokens(), presented)
            if token is None:
                raise self._unauthorized("invalid", "the bearer token is not valid")
            return Principal(token.name, token.scopes)
        if scope in OPEN_SCOPES:
            return Principal(ANONYMOUS, OPEN_SCOPES)
        # tokens off: the admin token opens the admin and user-data routes, as before scopes
        if presented is not None and self._admin is not None:
            digest = hashlib.sha256(presented.encode()).digest()
            if hmac.compare_digest(digest, self._admin):
                return Principal(ADMIN, frozenset(SCOPES))
        raise self._unauthorized(
            "missing" if presented is None else "invalid",
            "a valid admin token is required: Authorization: Bearer <PI_ADMIN_TOKEN>",
        )

    def _unauthorized(self, reason: str, message: str) -> UnauthorizedError:
        self.refused.labels(reason).inc()
        return UnauthorizedError(message, headers={"WWW-Authenticate": "Bearer"})

    def audit(
        self,
        principal: Principal | None,
        scope: str,
        method: str,
        route: str,
        user_id: str | None,
        status: int,
    ) -> None:
        """One line per audited call: who (``None``: refused before a token was accepted), what,
        whom (hashed), how it ended. Never the token, never the raw id."""
        outcome = f"{status // 100}xx"
        self.audited.labels(scope, outcome).inc()
        audit_logger.info(
            "audit",
            extra={
                "token": None if principal is None else principal.name,
                "scope": scope,
                "method": method,
                "route": route,
                "user": None if user_id is None else self.hash_user(user_id),
                "status": status,
                "outcome": outcome,
            },
        )

    def hash_user(self, user_id: str) -> str:
        """A user id as the audit log names it: HMAC-SHA256 under ``PI_AUDIT_KEY`` (a plain sha256
        without one, which anyone can recompute for a guessed id), 16 bytes in hex."""
        data = user_id.encode()
        if self._audit_key is None:
            return hashlib.sha256(data).hexdigest()[:32]
        return hmac.new(self._audit_key, data, hashlib.sha256).hexdigest()[:32]


def require_stored() -> None:
    """A 403 unless the caller may have scores computed from stored histories (by user id)."""
    principal = current.get()
    if principal is not None and PREDICT_STORED not in principal.scopes:
        raise ForbiddenError(
            f"the token {principal.name!r} may not score users by id (stored histories)",
            [
                ErrorDetail(
                    field="events", type="missing_scope", message=f"by user id needs {PREDICT_STORED!r}"
                )
            ],
        )


def require_inline() -> None:
    """A 403 unless the caller may score histories sent inline."""
    principal = current.get()
    if principal is not None and PREDICT not in principal.scopes:
        raise ForbiddenError(
            f"the token {principal.name!r} may only score users by id",
            [ErrorDetail(field="events", type="missing_scope", message=f"inline events need {PREDICT!r}")],
        )


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else ""
    return None
