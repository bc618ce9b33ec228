"""Request, response and error bodies: the HTTP contract, and the source of the OpenAPI schema.

Request models are strict (no string-to-number coercion, no epoch numbers for timestamps), reject
unknown fields (a misspelt ``as_of`` must not silently become "now") and non-finite numbers.
Timestamps must carry a UTC offset: a naive one is ambiguous by up to a day, which moves events
between the encoder's daily bins, so it is a 422 rather than a guess.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetPydanticSchema,
    WithJsonSchema,
)
from pydantic_core import core_schema

from service.features import DEFAULT_CHANNELS
from service.timestamps import EARLIEST, EARLIEST_SECONDS, LATEST, LATEST_SECONDS, SPAN, check_range

#: Per-event bounds: large enough for any real purchase, small enough that sums over 10k events
#: stay finite in float64 and the model never sees inf.
MAX_AMOUNT = 1e9
MAX_QUANTITY = 1_000_000
#: A purchase has at least one item: training drops zero-quantity rows, so the service refuses them
#: rather than score a purchase day training never saw (docs/model.md, "Data and cleaning").
MIN_QUANTITY = 1


def _digits(low: str, high: str) -> str:
    """A regex for the numbers from ``low`` to ``high``, both written with the same number of digits."""
    n = len(low)
    if low == high:
        return low
    if not low[1:].strip("0") and not high[1:].strip("9"):  # e.g. 1000..3999: [1-3][0-9]{3}
        head = low[0] if low[0] == high[0] else f"[{low[0]}-{high[0]}]"
        return head + ("" if n == 1 else "[0-9]" if n == 2 else f"[0-9]{{{n - 1}}}")
    if low[0] == high[0]:
        return low[0] + _digits(low[1:], high[1:])
    parts = [low[0] + _digits(low[1:], "9" * (n - 1))]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(_digits(f"{int(low[0]) + 1}" + "0" * (n - 1), f"{int(high[0]) - 1}" + "9" * (n - 1)))
    parts.append(high[0] + _digits("0" * (n - 1), high[1:]))
    return f"(?:{'|'.join(parts)})"


def _timestamp_pattern() -> str:
    """The range rule (``service.timestamps``) as a JSON Schema ``pattern`` on RFC 3339 strings.

    A regex reads the local date but cannot subtract the offset from the time of day, so on the
    first and the last day of the range it asks for an offset that keeps the instant inside
    (`Z`, or one that puts it later on the first day, earlier on the last): everything it admits is
    in range, and the server also takes the rest of those two days' instants. No leap second: the
    parser refuses ``:60``.
    """
    first, last = EARLIEST.year, LATEST.year - 1
    # the rule is a range of whole UTC years: the date regexes below rely on it
    assert EARLIEST.replace(year=1) == LATEST.replace(year=1) == datetime(1, 1, 1, tzinfo=UTC)
    day, month = "(?:0[1-9]|[12][0-9]|3[01])", "(?:0[1-9]|1[0-2])"
    hh_mm = "(?:[01][0-9]|2[0-3]):[0-5][0-9]"
    time = rf"[Tt]{hh_mm}:[0-5][0-9](?:\.[0-9]+)?"
    inside = (
        f"(?:{_digits(str(first + 1), str(last - 1))}-{month}-{day}"
        f"|{first}-(?:01-(?:0[2-9]|[12][0-9]|3[01])|(?:0[2-9]|1[0-2])-{day})"
        f"|{last}-(?:12-(?:0[1-9]|[12][0-9]|30)|(?:0[1-9]|1[01])-{day}))"
        f"{time}(?:[Zz]|[+-]{hh_mm})"
    )
    first_day = rf"{first}-01-01{time}(?:[Zz]|\+00:00|-{hh_mm})"
    last_day = rf"{last}-12-31{time}(?:[Zz]|-00:00|\+{hh_mm})"
    return f"^(?:{inside}|{first_day}|{last_day})$"


#: How OpenAPI shows a timestamp string: the range as a pattern, so that a generated (or a
#: client's) timestamp the schema admits is one the server takes.
TIMESTAMP_PATTERN = _timestamp_pattern()
_TIMESTAMP_SCHEMA = WithJsonSchema({"type": "string", "format": "date-time", "pattern": TIMESTAMP_PATTERN})


def _rfc3339_only(_: Any, __: Any) -> core_schema.CoreSchema:
    """An aware datetime from an RFC 3339 string and nothing else.

    pydantic's datetime also reads a string of digits as epoch seconds (or milliseconds, when
    large), which the contract refuses; a date-then-``T`` prefix gate shuts that door in
    pydantic-core, without a Python call per value, and answers as a non-datetime did before.
    """
    return core_schema.chain_schema(
        [
            core_schema.custom_error_schema(
                core_schema.str_schema(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt]", strict=True),
                custom_error_type="datetime_type",
            ),
            core_schema.datetime_schema(
                tz_constraint="aware", strict=False
            ),  # strict: a datetime object only
        ]
    )


_RFC3339 = GetPydanticSchema(_rfc3339_only)
#: A timestamp checked for range by pydantic itself, one Python call per value (for bodies that do
#: not go through ``request_columns``).
Timestamp = Annotated[AwareDatetime, _RFC3339, AfterValidator(check_range), _TIMESTAMP_SCHEMA]
#: Event timestamps and ``as_of`` in prediction requests: parsed by pydantic, range-checked
#: vectorised by the prediction routes once the events are flat columns
#: (``service.api.columns.check_timestamps``), with the same 422 and field path: a per-value Python
#: validator here would be a large share of a big batch's validation. Code that validates these
#: models without going through ``request_columns`` must check the range itself.
EventTimestamp = Annotated[AwareDatetime, _RFC3339, _TIMESTAMP_SCHEMA]
#: Epoch seconds in the columnar body, range-checked the same way (``service.bulk.columns_from_json``).
EpochSeconds = Annotated[
    float,
    WithJsonSchema({"type": "number", "minimum": EARLIEST_SECONDS, "exclusiveMaximum": LATEST_SECONDS}),
]
#: An event's ``timestamp`` as OpenAPI describes it, wherever an event is taken.
EVENT_TIMESTAMP_DESCRIPTION = f"RFC 3339 with a UTC offset (`Z` or `+hh:mm`), {SPAN}. Binned by UTC day."


def _integer(ge: int, le: int) -> GetPydanticSchema:
    """``int`` as JSON Schema's ``integer`` means it: ``654`` and ``654.0`` alike (one number to a
    JSON Schema validator), never ``654.5``, ``"654"`` or ``true``.

    pydantic's strict ``int`` refuses ``654.0`` and its lax one takes strings, so this is a
    pydantic-core chain (no Python call per value) that answers a non-integer with strict ``int``'s
    error, and a value out of bounds with ``Field(ge=, le=)``'s.
    """
    whole = core_schema.custom_error_schema(
        core_schema.union_schema(
            [
                core_schema.int_schema(strict=True),
                core_schema.chain_schema(
                    [
                        core_schema.float_schema(strict=True, allow_inf_nan=False),
                        core_schema.int_schema(strict=False),  # a float with no fraction, and only that
                    ]
                ),
            ],
            mode="left_to_right",
        ),
        custom_error_type="int_type",
    )
    schema = core_schema.chain_schema([whole, core_schema.int_schema(ge=ge, le=le)])
    return GetPydanticSchema(
        lambda _type, _handler: schema,
        lambda _schema, _handler: {"type": "integer", "minimum": ge, "maximum": le},
    )


Quantity = Annotated[int, _integer(MIN_QUANTITY, MAX_QUANTITY)]

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

_EXAMPLE_EVENTS: list[dict[str, Any]] = [
    {"timestamp": "1997-01-12T00:00:00Z", "amount": 29.33, "quantity": 2},
    {"timestamp": "1997-03-02T00:00:00Z", "amount": 12.49, "quantity": 1},
    {"timestamp": "1997-06-20T00:00:00Z", "amount": 57.0, "quantity": 4},
]
EXAMPLE_USER: dict[str, Any] = {
    "user_id": "u-1042",
    "as_of": "1997-09-30T00:00:00Z",
    "events": _EXAMPLE_EVENTS,
}
#: What every answer says about the model that produced it (the CDNOW model of `make train`).
_EXAMPLE_MODEL: dict[str, Any] = {
    "model_version": "cln-customer-split-19970930-6c351dd17f",
    "threshold": 0.3003,
    "horizon_days": 273,
}


class Event(BaseModel):
    """One purchase: when, how much was spent, how many items."""

    model_config = _STRICT

    timestamp: EventTimestamp = Field(description=EVENT_TIMESTAMP_DESCRIPTION)
    amount: float = Field(ge=0, le=MAX_AMOUNT, description="Money spent, >= 0.")
    quantity: Quantity = Field(description="Items bought, a whole number >= 1.")


class PredictRequest(BaseModel):
    """One user's purchase history and the moment to predict from."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"examples": [EXAMPLE_USER]})

    user_id: str = Field(min_length=1, max_length=256, description="Echoed back; never logged.")
    events: list[Event] | None = Field(
        default=None,
        description=(
            "The user's purchases in any order; may be empty (a user with no history). Events "
            "after `as_of` are ignored, even later on the same day. Several events on one UTC "
            "day count as one purchase day. Left out: the history stored by `POST /events` is "
            "used (inline events are used as sent, never merged with the stored ones)."
        ),
    )
    as_of: EventTimestamp | None = Field(
        default=None,
        description="Predict as seen at this instant (RFC 3339 with offset); default: now (UTC).",
    )


class BatchPredictRequest(BaseModel):
    """Several users scored in one inference call; predictions come back in request order."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "examples": [
                {
                    "users": [
                        EXAMPLE_USER,
                        {"user_id": "u-7", "events": [], "as_of": "1997-09-30T00:00:00Z"},
                    ]
                }
            ]
        },
    )

    users: list[PredictRequest] = Field(min_length=1, description="At least one user.")


EXAMPLE_COLUMNS: dict[str, Any] = {
    "columns": {
        "user_id": ["u-1042", "u-7"],
        "as_of": ["1997-09-30T00:00:00Z", 875577600],
        "offsets": [0, 3, 3],
        "timestamp": ["1997-01-12T00:00:00Z", 857260800, "1997-06-20T00:00:00Z"],
        "amount": [29.33, 12.49, 57.0],
        "quantity": [2, 1, 4],
    }
}


class ColumnarEvents(BaseModel):
    """Many users' events as one list per field: user ``i`` owns events ``offsets[i]`` up to
    ``offsets[i + 1]`` of ``timestamp``, ``amount`` and ``quantity``. Those three lists are equally
    long, ``as_of`` (when sent) is as long as ``user_id``, and no user owns more than
    `PI_MAX_EVENTS_PER_USER` events. JSON Schema cannot relate lists to each other, so this is said
    here: a body that breaks it is a 422 (`invalid_input` of type `offsets` or `length`, or
    `too_many_events`)."""

    model_config = _STRICT

    user_id: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        min_length=1, description="One id per user, in the order the predictions come back."
    )
    as_of: list[EpochSeconds | EventTimestamp | None] | None = Field(
        default=None,
        description="One per user: epoch seconds or RFC 3339 with an offset; null (or no column) = now.",
    )
    offsets: list[Annotated[int, _integer(0, 2**62)]] = Field(
        description="n_users + 1 non-decreasing positions into the event columns, from 0 to their length."
    )
    timestamp: list[EpochSeconds | EventTimestamp] = Field(
        description="Epoch seconds (fast: numbers go straight into numpy) or RFC 3339 with an offset; "
        f"{SPAN}."
    )
    amount: list[Annotated[float, Field(ge=0, le=MAX_AMOUNT)]] = Field(description="Money spent, >= 0.")
    quantity: list[Quantity] = Field(description="Items bought, whole numbers >= 1.")


class ColumnarPredictRequest(BaseModel):
    """``/predict/batch`` in columns: the same rules as the row format, without an object per event."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"examples": [EXAMPLE_COLUMNS]})

    columns: ColumnarEvents


class Prediction(BaseModel):
    """One user's score inside a batch response."""

    user_id: str
    probability: float = Field(description="P(at least one purchase within the horizon), 0..1.")
    will_purchase: bool = Field(description="probability >= the model's threshold.")


class PredictResponse(Prediction):
    """The answer for one user, with what is needed to interpret it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u-1042",
                    "probability": 0.5834,
                    "will_purchase": True,
                    **_EXAMPLE_MODEL,
                }
            ]
        }
    )

    threshold: float = Field(description="The model's decision threshold (chosen on validation).")
    horizon_days: int = Field(description="The prediction window after `as_of`, in days.")
    model_version: str = Field(description="The model that produced this answer.")


class BatchPredictResponse(BaseModel):
    """Predictions in request order, all from the same model."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EXAMPLE_MODEL,
                    "predictions": [
                        {"user_id": "u-1042", "probability": 0.5834, "will_purchase": True},
                        {"user_id": "u-7", "probability": 0.0213, "will_purchase": False},
                    ],
                }
            ]
        }
    )

    model_version: str
    threshold: float
    horizon_days: int
    predictions: list[Prediction]


class ColumnarPredictions(BaseModel):
    """One list per field, in request order."""

    user_id: list[str]
    probability: list[float]
    will_purchase: list[bool]


class ColumnarPredictResponse(BaseModel):
    """The answer to a columnar ``/predict/batch`` body, in columns too."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EXAMPLE_MODEL,
                    "columns": {
                        "user_id": ["u-1042", "u-7"],
                        "probability": [0.5834, 0.0213],
                        "will_purchase": [True, False],
                    },
                }
            ]
        }
    )

    model_version: str
    threshold: float
    horizon_days: int
    columns: ColumnarPredictions


class ErrorItem(BaseModel):
    """One problem with the request, located by its field path (never the offending value)."""

    field: str = Field(description='Dotted path into the body, e.g. "users[0].events[3].amount".')
    type: str = Field(description="A stable machine-readable kind, e.g. greater_than_equal.")
    message: str


class ErrorResponse(BaseModel):
    """Every non-2xx answer has this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "invalid_input",
                    "message": "the request body does not match the schema",
                    "detail": [
                        {
                            "field": "events[0].amount",
                            "type": "greater_than_equal",
                            "message": "Input should be greater than or equal to 0",
                        }
                    ],
                }
            ]
        }
    )

    error: str = Field(description="A stable code: invalid_json, invalid_input, too_many_users, ...")
    message: str
    detail: list[ErrorItem] = Field(default_factory=list)


class HealthResponse(BaseModel):
    """Liveness: the process answers. Never depends on the model."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str


class ReadinessResponse(BaseModel):
    """Readiness: 200 only once a model is loaded and has answered warm-up inferences."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ready": True,
                    "status": "ready",
                    "reason": None,
                    "model_version": _EXAMPLE_MODEL["model_version"],
                    "provider": "CPUExecutionProvider",
                    "provider_fallback": False,
                },
                {
                    "ready": False,
                    "status": "loading",
                    "reason": "loading and warming up the model",
                    "model_version": None,
                    "provider": None,
                    "provider_fallback": None,
                },
            ]
        }
    )

    ready: bool
    status: str = Field(
        description="loading | ready | failed | draining | store_unavailable | workers_not_ready"
    )
    reason: str | None = Field(description="Why not ready; null when ready.")
    model_version: str | None
    provider: str | None = Field(description="The execution provider onnxruntime actually runs on.")
    provider_fallback: bool | None = Field(
        description="True when onnxruntime silently fell back from the first provider asked for."
    )
    store: str | None = Field(
        default=None,
        description="The event store: `ok`, `unavailable` (predictions by user id and writes get "
        "503 until it is back) or null when none is configured.",
    )


class RuntimeResponse(BaseModel):
    """How the model is being run."""

    requested_providers: list[str] = Field(description="Preferred providers this build offers.")
    active_providers: list[str] = Field(description="What the session reports, first one in use.")
    provider: str
    provider_fallback: bool
    batch_sizes: list[int] = Field(description="Batches are padded to these sizes (all warmed up).")
    load_seconds: float = Field(description="Load plus warm-up time.")
    loaded_at: str = Field(description="RFC 3339, UTC.")


class ModelResponse(BaseModel):
    """The served model's metadata, as written by the exporter, plus how it is being run."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EXAMPLE_MODEL,
                    "created_at": "2026-11-25T21:45:00Z",
                    "horizon_weeks": 39,
                    "protocol": "customer-split",
                    "cutoff": "1997-09-30",
                    "data_fingerprint": "d4d74010...",
                    "feature_spec": {
                        "lookback_bins": 52,
                        "bin_days": 7,
                        "channels": list(DEFAULT_CHANNELS),
                        "lookback_days": 364,
                        "time_axis": "oldest bin first; the last bin contains as_of",
                    },
                    "training_metrics": {"test": {"roc_auc": 0.7697, "brier": 0.1593}},
                    "hyperparameters": {"conv_channels": 16, "origins": 4},
                    "opset": 20,
                    "n_seeds": 5,
                    "format_version": 1,
                    "runtime": {
                        "requested_providers": ["CPUExecutionProvider"],
                        "active_providers": ["CPUExecutionProvider"],
                        "provider": "CPUExecutionProvider",
                        "provider_fallback": False,
                        "batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256],
                        "load_seconds": 0.042,
                        "loaded_at": "2026-11-25T22:00:00.000Z",
                    },
                }
            ]
        }
    )

    model_version: str
    created_at: str
    threshold: float
    horizon_weeks: int
    horizon_days: int
    protocol: str
    cutoff: str
    data_fingerprint: str
    feature_spec: dict[str, Any]
    training_metrics: dict[str, Any]
    hyperparameters: dict[str, Any]
    opset: int
    n_seeds: int
    format_version: int
    runtime: RuntimeResponse
    loaded: list[LoadedModelResponse] = Field(
        description="Every model loaded, the served one (`primary`) first, then a `shadow` and a "
        "`canary` when loaded (`PUT /admin/models/{role}`)."
    )


class LoadedModelResponse(BaseModel):
    """One loaded model and its share of the traffic."""

    role: Literal["primary", "shadow", "canary"]
    model_version: str
    horizon_days: int
    threshold: float
    sample: float | None = Field(
        description="Shadow: the fraction of scoring calls it also scores (after the answer)."
    )
    percent: float | None = Field(description="Canary: the percent of users it answers.")
    load_seconds: float
    loaded_at: str = Field(description="RFC 3339, UTC.")


class ReloadRequest(BaseModel):
    """What ``POST /admin/reload`` should load; an empty body reloads the configured model file."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [{}]})

    model_path: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00]+$",
        description="A model file on the server; default: the configured `PI_MODEL_PATH`.",
    )


class ReloadResponse(BaseModel):
    """The model now serving, and the one it replaced."""

    model_version: str
    previous_version: str | None = Field(description="Null when no model was serving before.")
    load_seconds: float = Field(description="Load, validation and warm-up time of the new model.")


ModelPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]


class ShadowRequest(BaseModel):
    """What ``PUT /admin/models/shadow`` should load beside the served model."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={"examples": [{"model_path": "models/next/model.onnx", "sample": 0.1}]},
    )

    model_path: ModelPath | None = Field(
        default=None,
        description="A model file on the server; default: the configured `PI_SHADOW_MODEL`.",
    )
    sample: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Fraction of scoring calls the shadow also scores; default `PI_SHADOW_SAMPLE`.",
    )


class CanaryRequest(BaseModel):
    """What ``PUT /admin/models/canary`` should load beside the served model."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={"examples": [{"model_path": "models/next/model.onnx", "percent": 5}]},
    )

    model_path: ModelPath | None = Field(
        default=None,
        description="A model file on the server; default: the configured `PI_CANARY_MODEL`.",
    )
    percent: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="Percent of users (by a hash of `user_id`) the canary answers; default "
        "`PI_CANARY_PERCENT`.",
    )


class PlacedResponse(BaseModel):
    """The model now loaded in a role, and the one it replaced there."""

    role: Literal["primary", "shadow", "canary"]
    model_version: str
    previous_version: str | None = Field(description="Null when that role was empty.")
    load_seconds: float = Field(description="Load, validation and warm-up time of the model.")


class UnloadResponse(BaseModel):
    """What ``DELETE /admin/models/{role}`` unloaded."""

    role: Literal["shadow", "canary"]
    unloaded_version: str | None = Field(description="Null when none was loaded (nothing to do).")
