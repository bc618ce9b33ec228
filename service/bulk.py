"""Bulk bodies for ``/predict/batch``: columnar JSON and Apache Arrow IPC, straight into columns.

The row format makes pydantic build a Python object per event and read them back one by one. A
columnar body is already the encoder's shape: pydantic-core parses one list per field and numpy
converts each in one call; an Arrow stream needs no Python per value at all. Both are then checked
by the row format's rules, vectorised, with errors naming fields the way the client sent them.
pyarrow is optional (the ``arrow`` extra) and imported on the first Arrow request, so a service
that never sees one does not pay its memory.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from service.columns import EventColumns
from service.errors import (
    ErrorDetail,
    InvalidArrowError,
    InvalidInputError,
    ServiceError,
    UnsupportedMediaTypeError,
    from_validation_error,
    too_many_events,
    too_many_users,
)
from service.schemas import (
    MAX_AMOUNT,
    MAX_QUANTITY,
    MIN_QUANTITY,
    ColumnarPredictRequest,
)
from service.timestamps import RANGE_MESSAGE, in_range

if TYPE_CHECKING:
    import pyarrow as pa

ARROW_MEDIA_TYPE = "application/vnd.apache.arrow.stream"

_MAX_FIELDS = 100  # offending values named in one error; the message gives the count
_COLUMNS_KEY = re.compile(rb'\s*\{\s*"columns"\s*:')
_UNION_TAG = re.compile(r"^(columns\.(?:timestamp|as_of)\[\d+\])\..*$")
_TIMESTAMP_MESSAGE = "Input should be epoch seconds or an RFC 3339 timestamp with a UTC offset"


def is_columnar_json(body: bytes) -> bool:
    """A JSON body whose first key is ``columns`` (a valid columnar body has no other key)."""
    return _COLUMNS_KEY.match(body) is not None


@dataclass(frozen=True)
class _Unchecked:
    """A bulk body before its checks: flat float seconds (NaN ``as_of`` = now) and values."""

    user_ids: list[str]
    offsets: NDArray[np.int64]
    timestamps: NDArray[np.float64]  # epoch seconds, may carry fractions
    amounts: NDArray[np.float64]
    quantities: NDArray[np.float64]
    as_of: NDArray[np.float64]  # [n_users], NaN where the client left it to "now"


@dataclass(frozen=True)
class FieldNames:
    """How errors name fields in the client's format."""

    users: str  # the user id column
    offsets: Callable[[int], str]  # user i's extent
    event: Callable[[int, int, int, str], str]  # (user, index within user, flat index, field)
    as_of: Callable[[int], str]
    all_offsets: str  # the extents as a whole
    all_events: str  # the event columns as a whole


_JSON_NAMES = FieldNames(
    users="columns.user_id",
    offsets=lambda i: f"columns.offsets[{i + 1}]",
    event=lambda _u, _e, j, name: f"columns.{name}[{j}]",
    as_of=lambda i: f"columns.as_of[{i}]",
    all_offsets="columns.offsets",
    all_events="columns",
)
_ARROW_NAMES = FieldNames(
    users="user_id",
    offsets=lambda i: f"events[{i}]",
    event=lambda u, e, _j, name: f"events[{u}][{e}].{name}",
    as_of=lambda i: f"as_of[{i}]",
    all_offsets="events",
    all_events="events",
)


def _seconds(values: Sequence[Any]) -> NDArray[np.float64]:
    """Epoch numbers and aware datetimes (pydantic already refused anything else) -> float seconds."""
    try:
        return np.array(values, dtype=np.float64)  # the fast path: all numbers
    except TypeError:
        return np.array(
            [math.nan if v is None else v if isinstance(v, int | float) else v.timestamp() for v in values],
            dtype=np.float64,
        )


def columns_from_json(body: bytes, *, now: int, max_users: int, max_events: int) -> EventColumns:
    """A columnar JSON body as checked columns (with the user ids); ``now`` stands in for a
    missing ``as_of``. Raises the 4xx errors."""
    return _check(_parse_json(body), now=now, max_users=max_users, max_events=max_events, names=_JSON_NAMES)


def columns_from_arrays(
    user_ids: list[str],
    offsets: NDArray[np.int64],
    timestamps: NDArray[np.float64],
    amounts: NDArray[np.float64],
    quantities: NDArray[np.float64],
    as_of: NDArray[np.float64],
    *,
    now: int,
    max_users: int,
    max_events: int,
    names: FieldNames,
) -> EventColumns:
    """Columns a caller decoded itself (the V2 tensors) under the same checks as a columnar body;
    ``as_of`` NaN = now, ``names`` says how errors name the fields. Raises the 4xx errors."""
    batch = _Unchecked(user_ids, offsets, timestamps, amounts, quantities, as_of)
    return _check(batch, now=now, max_users=max_users, max_events=max_events, names=names)


def _parse_json(body: bytes) -> _Unchecked:
    """Parse and type-check a columnar JSON body (one pydantic-core pass, no object per event)."""
    try:
        request = ColumnarPredictRequest.model_validate_json(body)
    except ValidationError as exc:
        error = from_validation_error(exc)
        items: list[ErrorDetail] = []
        seen: set[str] = set()
        for item in error.detail:
            match = _UNION_TAG.match(item.field)
            if match:  # "columns.timestamp[3].float" and "...[3].datetime": one item per value
                if match.group(1) in seen:
                    continue
                item = ErrorDetail(field=match.group(1), type="timestamp_type", message=_TIMESTAMP_MESSAGE)
            seen.add(item.field)
            items.append(item)
        error.detail = items
        raise error from None
    c = request.columns
    n = len(c.user_id)
    as_of = np.full(n, math.nan) if c.as_of is None else _seconds(c.as_of)
    return _Unchecked(
        user_ids=c.user_id,
        offsets=np.array(c.offsets, dtype=np.int64),
        timestamps=_seconds(c.timestamp),
        amounts=np.array(c.amount, dtype=np.float64),
        quantities=np.array(c.quantity, dtype=np.float64),
        as_of=as_of,
    )


def _invalid(field: str, kind: str, message: str) -> InvalidInputError:
    return InvalidInputError(
        "the request body does not match the schema", [ErrorDetail(field=field, type=kind, message=message)]
    )


def _named(
    cls: type[ServiceError], message: str, fields: Sequence[str], kind: str, detail: str
) -> ServiceError:
    return cls(message, [ErrorDetail(field=f, type=kind, message=detail) for f in fields[:_MAX_FIELDS]])


def _check(
    batch: _Unchecked, *, now: int, max_users: int, max_events: int, names: FieldNames
) -> EventColumns:
    """The row format's rules, vectorised; the columns the encoder takes. Raises the 4xx errors."""
    n = len(batch.user_ids)
    if n > max_users:
        raise too_many_users(max_users, names.users)
    if n == 0:
        raise _invalid(names.users, "too_short", "at least one user is needed")
    bad_ids = [i for i, u in enumerate(batch.user_ids) if not 1 <= len(u) <= 256]
    if bad_ids:
        raise _named(
            InvalidInputError,
            "the request body does not match the schema",
            [f"{names.users}[{i}]" for i in bad_ids],
            "string_length",
            "a user id is 1 to 256 characters",
        )
    if batch.as_of.size != n:
        raise _invalid(
            names.as_of(0).split("[")[0], "length", f"as_of has {batch.as_of.size} values for {n} users"
        )
    offsets, n_events = batch.offsets, batch.timestamps.size
    if offsets.size != n + 1 or offsets[0] != 0 or offsets[-1] != n_events or np.any(np.diff(offsets) < 0):
        raise _invalid(
            names.all_offsets,
            "offsets",
            f"offsets must be n_users + 1 = {n + 1} non-decreasing positions from 0 to the number "
            f"of events ({n_events})",
        )
    if not batch.amounts.size == batch.quantities.size == n_events:
        raise _invalid(
            names.all_events,
            "length",
            f"timestamp, amount and quantity differ in length: {n_events}, {batch.amounts.size}, "
            f"{batch.quantities.size}",
        )
    over = np.flatnonzero(np.diff(offsets) > max_events)
    if over.size:
        raise too_many_events(max_events, [names.offsets(int(i)) for i in over[:_MAX_FIELDS]], int(over.size))
    user = np.searchsorted(offsets, np.arange(n_events), side="right") - 1

    def _events(mask: NDArray[np.bool_], name: str) -> list[str]:
        flat = np.flatnonzero(mask)
        return [
            names.event(int(user[j]), int(j - offsets[user[j]]), int(j), name) for j in flat[:_MAX_FIELDS]
        ]

    ts, amt, qty, as_of = batch.timestamps, batch.amounts, batch.quantities, batch.as_of
    problems: list[ErrorDetail] = []
    for mask, name, kind, message in (
        (~in_range(ts), "timestamp", "value_error", RANGE_MESSAGE),
        (~((amt >= 0) & (amt <= MAX_AMOUNT)), "amount", "range", f"a finite number in [0, {MAX_AMOUNT:g}]"),
        (
            ~((qty >= MIN_QUANTITY) & (qty <= MAX_QUANTITY) & (qty == np.floor(qty))),
            "quantity",
            "range",
            f"a whole number in [{MIN_QUANTITY}, {MAX_QUANTITY}]",
        ),
    ):
        problems += [ErrorDetail(field=f, type=kind, message=message) for f in _events(mask, name)]
    bad_as_of = np.flatnonzero(~np.isnan(as_of) & ~in_range(as_of))
    problems += [
        ErrorDetail(field=names.as_of(int(i)), type="value_error", message=RANGE_MESSAGE) for i in bad_as_of
    ]
    if problems:
        raise InvalidInputError("the request body does not match the schema", problems[:_MAX_FIELDS])
    return EventColumns(
        timestamps=np.floor(ts).astype(np.int64),
        amounts=amt,
        quantities=qty,
        offsets=offsets,
        as_of=np.floor(np.where(np.isnan(as_of), now, as_of)).astype(np.int64),
        user_ids=batch.user_ids,
    )


# --- Arrow ---------------------------------------------------------------------------------------


def require_arrow() -> None:
    """The 415 for an Arrow body on a server without pyarrow, before the body is read."""
    _pyarrow()


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.ipc  # the package does not import its ipc submodule
    except ImportError:
        raise UnsupportedMediaTypeError(
            f"{ARROW_MEDIA_TYPE} bodies need pyarrow, which this server lacks (install the service "
            "with its `arrow` extra); send JSON instead"
        ) from None
    return pa


_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_ARROW_FIELDS = ("user_id", "as_of", "events")
_EVENT_FIELDS = ("timestamp", "amount", "quantity")


def _arrow_seconds(pa: Any, array: pa.Array, field: str) -> NDArray[np.float64]:
    """A timestamp-with-time-zone or numeric (epoch seconds) Arrow array -> float seconds, NaN null."""
    kind = array.type
    if pa.types.is_timestamp(kind):
        if kind.tz is None:
            raise _invalid(field, "timezone_aware", "a timestamp column needs a time zone (UTC offset)")
        raw = array.cast(pa.int64()).to_numpy(zero_copy_only=False)
        return np.asarray(raw, dtype=np.float64) / _UNITS[kind.unit]
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return np.asarray(array.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    raise _invalid(field, "timestamp_type", f"{_TIMESTAMP_MESSAGE}, got Arrow type {kind}")


def _no_nulls(array: pa.Array, field: Callable[[int], str]) -> None:
    if array.null_count:
        nulls = np.flatnonzero(np.asarray(array.is_null().to_numpy(zero_copy_only=False)))
        raise _named(
            InvalidInputError,
            "the request body does not match the schema",
            [field(int(i)) for i in nulls],
            "missing",
            "null is not allowed here",
        )


def _compressed(meta: bytes) -> bool:
    """Whether an IPC ``Message`` flatbuffer holds a ``RecordBatch`` with a ``compression`` field.

    Reads the three offsets it needs by hand (flatbuffers: a root offset, then per table a signed
    offset back to its vtable of 16-bit field offsets) rather than pulling in a flatbuffers
    package; pyarrow has verified nothing yet, so a malformed buffer raises ``struct.error``.
    """

    def field(table: int, index: int) -> int:
        vtable = table - struct.unpack_from("<i", meta, table)[0]
        size = struct.unpack_from("<H", meta, vtable)[0]
        at = 4 + 2 * index
        return 0 if at >= size else int(struct.unpack_from("<H", meta, vtable + at)[0])

    message = struct.unpack_from("<I", meta, 0)[0]
    header = field(message, 2)  # Message.header
    if not header:
        return False
    batch = message + header + struct.unpack_from("<I", meta, message + header)[0]
    return field(batch, 3) != 0  # RecordBatch.compression


def columns_from_arrow(body: bytes, *, now: int, max_users: int, max_events: int) -> EventColumns:
    """An Arrow IPC stream as checked columns (with the user ids), as :func:`columns_from_json`."""
    batch = _parse_arrow(body, max_users=max_users)
    return _check(batch, now=now, max_users=max_users, max_events=max_events, names=_ARROW_NAMES)


def _parse_arrow(body: bytes, *, max_users: int) -> _Unchecked:
    """An Arrow IPC stream with one row per user: ``user_id`` (string), optional ``as_of``
    (timestamp with a time zone, or epoch seconds; null = now) and ``events``
    (list of struct ``timestamp``, ``amount``, ``quantity``)."""
    pa = _pyarrow()
    unreadable = InvalidArrowError(
        "the request body is not a valid Arrow IPC stream",
        [ErrorDetail(field="body", type="arrow_invalid", message="not a readable Arrow IPC stream")],
    )
    try:
        # Message by message, so each record batch's header is seen before its body is decoded.
        messages = pa.ipc.MessageReader.open_stream(pa.py_buffer(body))
        first = messages.read_next_message()
        if first.type != "schema":
            raise unreadable
        schema = pa.ipc.read_schema(first)
        batches = []
        rows = 0
        for message in messages:
            if message.type != "record batch":
                raise _invalid("body", "arrow_dictionary", "dictionary-encoded columns are not supported")
            if _compressed(message.metadata.to_pybytes()):
                # a body-sized zstd buffer can decode to gigabytes: the body limit bounds only plain ones
                raise _invalid("body", "arrow_compressed", "compressed Arrow buffers are not accepted")
            record_batch = pa.ipc.read_record_batch(message, schema)
            record_batch.validate(full=True)  # bounds-checks offsets before numpy reads them
            rows += record_batch.num_rows
            if rows > max_users:
                raise too_many_users(max_users, "user_id")
            batches.append(record_batch)
        table = pa.Table.from_batches(batches, schema=schema)
        return _columns_of(pa, table)
    except (pa.ArrowException, ValueError, TypeError, OSError, LookupError, struct.error, StopIteration):
        # pyarrow's own errors on a malformed stream, and what its accessors raise on one that
        # passed them (field names that are not UTF-8, ...); our 4xx are ServiceErrors, not these
        raise unreadable from None


def _columns_of(pa: Any, table: pa.Table) -> _Unchecked:
    names = table.schema.names
    unknown = [n for n in names if n not in _ARROW_FIELDS]
    missing = [n for n in ("user_id", "events") if n not in names]
    if unknown or missing:
        raise InvalidInputError(
            "the request body does not match the schema",
            [ErrorDetail(field=n, type="extra_forbidden", message="unknown column") for n in unknown]
            + [ErrorDetail(field=n, type="missing", message="column required") for n in missing],
        )
    users = table.column("user_id").combine_chunks()
    if not (pa.types.is_string(users.type) or pa.types.is_large_string(users.type)):
        raise _invalid("user_id", "string_type", f"user_id must be a string column, got {users.type}")
    _no_nulls(users, lambda i: f"user_id[{i}]")
    events = table.column("events").combine_chunks()
    kind = events.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(
        kind.value_type
    ):
        raise _invalid("events", "list_type", f"events must be a list of structs, got {kind}")
    _no_nulls(events, lambda i: f"events[{i}]")
    struct_fields = [kind.value_type.field(i).name for i in range(kind.value_type.num_fields)]
    if sorted(struct_fields) != sorted(_EVENT_FIELDS):
        raise _invalid(
            "events", "struct_fields", f"each event is a struct of {list(_EVENT_FIELDS)}, got {struct_fields}"
        )
    raw_offsets = np.asarray(events.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    offsets = raw_offsets - raw_offsets[0]
    values = events.flatten()  # honours the list's own offset into its values
    _no_nulls(values, lambda j: f"events[*][{j}]")
    children = dict(zip(struct_fields, values.flatten(), strict=True))
    user = np.searchsorted(offsets, np.arange(int(offsets[-1])), side="right") - 1

    def _event_path(name: str) -> Callable[[int], str]:
        return lambda j: f"events[{int(user[j])}][{int(j - offsets[user[j]])}].{name}"

    for name, child in children.items():
        _no_nulls(child, _event_path(name))
    amount, quantity = children["amount"], children["quantity"]
    if not (pa.types.is_floating(amount.type) or pa.types.is_integer(amount.type)):
        raise _invalid("events.amount", "float_type", f"amount must be a number column, got {amount.type}")
    if not pa.types.is_integer(quantity.type):
        raise _invalid(
            "events.quantity", "int_type", f"quantity must be an integer column, got {quantity.type}"
        )
    as_of = (
        np.full(len(users), math.nan)
        if "as_of" not in names
        else _arrow_seconds(pa, table.column("as_of").combine_chunks(), "as_of")
    )
    return _Unchecked(
        user_ids=users.to_pylist(),
        offsets=offsets,
        timestamps=_arrow_seconds(pa, children["timestamp"], "events.timestamp"),
        amounts=np.asarray(amount.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64),
        quantities=np.asarray(quantity.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64),
        as_of=as_of,
    )


def arrow_answer(
    user_ids: Sequence[str],
    probabilities: NDArray[np.float32],
    *,
    threshold: float,
    horizon_days: int,
    model_version: str,
) -> bytes:
    """One record batch ``user_id, probability (float32), will_purchase``; the model's version,
    threshold and horizon in the schema metadata."""
    pa = _pyarrow()
    table = pa.table(
        {
            "user_id": pa.array(user_ids, type=pa.string()),
            "probability": pa.array(probabilities, type=pa.float32()),
            # compared in float64, as the JSON answers compare the widened float32
            "will_purchase": pa.array(probabilities.astype(np.float64) >= threshold, type=pa.bool_()),
        }
    ).replace_schema_metadata(
        {"model_version": model_version, "threshold": repr(threshold), "horizon_days": str(horizon_days)}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())
