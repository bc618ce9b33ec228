"""The scopes a bearer token can hold (``PI_TOKENS_FILE``), one per route; see ``service/auth.py``."""

from __future__ import annotations

PUBLIC = "public"  # probes and API docs: no token, no rate limit
PREDICT = "predict"  # scores from histories sent inline
PREDICT_STORED = "predict:stored"  # scores from stored histories (by user id): an oracle on them
INGEST = "ingest"  # POST /events
USERS_READ = "users:read"
USERS_DELETE = "users:delete"
ADMIN = "admin"
METRICS = "metrics"  # /metrics and the live-quality JSON; public unless PI_METRICS_REQUIRE_TOKEN
SCOPES: tuple[str, ...] = (PREDICT, PREDICT_STORED, INGEST, USERS_READ, USERS_DELETE, ADMIN, METRICS)
