"""The Open Inference Protocol (KServe V2) bodies: tensors in, tensors out, no HTTP in here.

Two models answer. ``purchase-intent`` takes raw histories as columns, the columnar
``/predict/batch`` body as tensors, checked by the same rules (``service/bulk.py``) and scored by
the same :class:`service.scoring.Scorer`, so both answer the same float32 for the same users.
``purchase-intent-features`` takes the encoded tensor the ONNX file takes. A body is JSON, or JSON
followed by raw tensor bytes (Triton's binary tensor data extension, the JSON's length in the
``Inference-Header-Content-Length`` header). docs/v2.md documents the tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.bulk import FieldNames, columns_from_arrays
from service.columns import EventColumns
from service.errors import (
    ErrorDetail,
    InvalidInputError,
    InvalidJSONError,
    ServiceError,
    from_validation_error,
    too_many_users,
)
from service.features import FeatureSpec

HISTORIES = "purchase-intent"
FEATURES = "purchase-intent-features"
MODEL_NAMES = (HISTORIES, FEATURES)
#: What ``GET /v2`` advertises beyond the core protocol.
EXTENSIONS = ("binary_tensor_data",)
#: The header of the binary extension: the JSON part's length in bytes, the tensors follow it.
HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORM = "onnxruntime_onnx"

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
]  # fmt: skip

_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: numpy kinds a JSON ``data`` list may parse to for each datatype we take (bools are not numbers)
_JSON_KINDS = {"INT64": "i", "FP64": "if", "FP32": "if"}
_MAX_DIM = 2**31
_MAX_LISTED = 10


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as model metadata names it; ``-1`` is a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    required: bool = True

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


HISTORY_INPUTS = (
    TensorSpec("user_id", "BYTES", (-1,)),
    TensorSpec("offsets", "INT64", (-1,)),
    TensorSpec("timestamp", "INT64", (-1,)),
    TensorSpec("amount", "FP64", (-1,)),
    TensorSpec("quantity", "INT64", (-1,)),
    TensorSpec("as_of", "INT64", (-1,), required=False),
)
OUTPUTS = (TensorSpec("probability", "FP32", (-1,)), TensorSpec("will_purchase", "BOOL", (-1,)))


def input_specs(model: str, spec: FeatureSpec) -> tuple[TensorSpec, ...]:
    if model == HISTORIES:
        return HISTORY_INPUTS
    return (TensorSpec("features", "FP32", (-1, spec.lookback_bins, spec.n_channels)),)


# --- the protocol's bodies (they are the OpenAPI contract of the /v2 routes) ----------------------

_Dim = Annotated[int, Field(ge=0, le=_MAX_DIM, strict=True)]


class RequestInput(BaseModel):
    """One input tensor: ``data`` in row-major order (flat or nested), or, with the binary
    extension, ``parameters.binary_data_size`` bytes of the body after the JSON."""

    name: str = Field(min_length=1, max_length=256, strict=True)
    shape: list[_Dim] = Field(max_length=8)
    datatype: Datatype
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    """An output asked for; ``parameters.binary_data: true`` asks for it as raw bytes."""

    name: str = Field(strict=True)
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """The V2 inference request. Unknown ``parameters`` (and keys) are tolerated."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "r-1",
                    "inputs": [
                        {"name": "user_id", "shape": [2], "datatype": "BYTES", "data": ["u-1042", "u-7"]},
                        {"name": "offsets", "shape": [3], "datatype": "INT64", "data": [0, 2, 2]},
                        {
                            "name": "timestamp",
                            "shape": [2],
                            "datatype": "INT64",
                            "data": [853027200, 857347200],
                        },
                        {"name": "amount", "shape": [2], "datatype": "FP64", "data": [29.33, 12.5]},
                        {"name": "quantity", "shape": [2], "datatype": "INT64", "data": [2, 1]},
                        {"name": "as_of", "shape": [2], "datatype": "INT64", "data": [875577600, 875577600]},
                    ],
                }
            ]
        }
    )

    id: str | None = Field(default=None, strict=True)
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=16)
    outputs: list[RequestOutput] | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a variable dimension.")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        default=None, description="`binary_data_size` when the tensor follows the JSON as raw bytes."
    )
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(default=None, description="The request's `id`, echoed.")
    parameters: dict[str, Any] | None = Field(
        default=None, description="`threshold` (of `will_purchase`) and `horizon_days` of the model."
    )
    outputs: list[ResponseOutput]


class V2ErrorResponse(BaseModel):
    """The protocol's error body; a refusal before the route (body too large, overloaded) is the
    service's envelope, whose ``error`` is its code."""

    model_config = ConfigDict(extra="allow")

    error: str


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


def error_text(error: ServiceError) -> str:
    """A typed error as the protocol's one string: the message, then the fields it names."""
    fields = "; ".join(f"{d.field}: {d.message}" for d in error.detail[:_MAX_LISTED])
    more = f" (and {len(error.detail) - _MAX_LISTED} more)" if len(error.detail) > _MAX_LISTED else ""
    return f"{error.message}: {fields}{more}" if fields else error.message


# --- requests -------------------------------------------------------------------------------------

Tensor = NDArray[Any] | list[str]


def _invalid(field: str, kind: str, message: str) -> InvalidInputError:
    return InvalidInputError(
        "the inference request does not match the model's inputs",
        [ErrorDetail(field=field, type=kind, message=message)],
    )


def header_length(value: str | None, body_size: int) -> int | None:
    """The binary extension's JSON length, checked against the body (``None``: all JSON)."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if not 0 < length <= body_size:
        raise InvalidJSONError(
            "the inference header length is wrong",
            [
                ErrorDetail(
                    field=HEADER_LENGTH,
                    type="binary_header",
                    message=f"a whole number from 1 to the body's length ({body_size})",
                )
            ],
        )
    return length


def parse_request(
    body: bytes, json_length: int | None, specs: Sequence[TensorSpec]
) -> tuple[InferenceRequest, dict[str, Tensor]]:
    """The request and its inputs as arrays (``BYTES`` as a list of str), each checked against its
    spec: name, datatype, shape and element count. Raises the 4xx errors naming the tensor."""
    head = body if json_length is None else body[:json_length]
    try:
        request = InferenceRequest.model_validate_json(head)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    by_name = {s.name: s for s in specs}
    tensors: dict[str, Tensor] = {}
    binary = memoryview(body)[len(head) :]
    cursor = 0
    for i, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name)
        if spec is None:
            raise _invalid(f"inputs[{i}].name", "unknown_input", f"this model's inputs are {list(by_name)}")
        if tensor.name in tensors:
            raise _invalid(f"inputs[{i}].name", "duplicate_input", f"{tensor.name} is sent twice")
        name = tensor.name
        if tensor.datatype != spec.datatype:
            raise _invalid(
                f"{name}.datatype", "datatype", f"{name} is {spec.datatype}, got {tensor.datatype}"
            )
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape) or any(
            want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
        ):
            raise _invalid(
                f"{name}.shape", "shape", f"{name} has shape {list(spec.shape)}, got {list(shape)}"
            )
        count = math.prod(shape)
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or cursor + size > len(binary):
                raise _invalid(
                    f"{name}.parameters.binary_data_size",
                    "binary_data_size",
                    f"a byte count within the {len(binary)} bytes after the inference header",
                )
            if tensor.data is not None:
                raise _invalid(f"{name}.data", "binary_data", "data and binary_data_size exclude each other")
            tensors[name] = _from_bytes(spec, binary[cursor : cursor + size], count)
            cursor += size
        elif tensor.data is None:
            raise _invalid(f"{name}.data", "missing", f"{name} has neither data nor binary_data_size")
        else:
            tensors[name] = _from_json(spec, tensor.data, count)
        if isinstance(tensors[name], np.ndarray):
            tensors[name] = tensors[name].reshape(shape)  # type: ignore[union-attr]
    if cursor != len(binary):
        raise _invalid(
            "body",
            "binary_data_size",
            f"the inputs' binary_data_size add up to {cursor} bytes but {len(binary)} follow the header",
        )
    missing = [s.name for s in specs if s.required and s.name not in tensors]
    if missing:
        raise InvalidInputError(
            "the inference request does not match the model's inputs",
            [ErrorDetail(field=m, type="missing", message="input required") for m in missing],
        )
    return request, tensors


def _count_error(spec: TensorSpec, count: int, got: int) -> InvalidInputError:
    return _invalid(f"{spec.name}.data", "count", f"the shape says {count} values, got {got}")


def _from_json(spec: TensorSpec, data: list[Any], count: int) -> Tensor:
    if spec.datatype == "BYTES":
        if not all(isinstance(v, str) for v in data):
            raise _invalid(f"{spec.name}.data", "string_type", "a flat list of strings")
        if len(data) != count:
            raise _count_error(spec, count, len(data))
        return data
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        raise _invalid(f"{spec.name}.data", "shape", "nested lists of unequal lengths") from None
    if array.size != count:
        raise _count_error(spec, count, int(array.size))
    if array.size == 0:
        return np.zeros(0, dtype=_NUMPY[spec.datatype])
    if array.dtype.kind not in _JSON_KINDS[spec.datatype]:
        kind = "whole numbers within int64" if spec.datatype == "INT64" else "numbers"
        raise _invalid(f"{spec.name}.data", "number_type", f"{spec.datatype} data are {kind}")
    return array.reshape(-1).astype(_NUMPY[spec.datatype], copy=False)


def _from_bytes(spec: TensorSpec, raw: memoryview, count: int) -> Tensor:
    if spec.datatype == "BYTES":
        return _strings(spec, raw, count)
    dtype = _NUMPY[spec.datatype]
    if len(raw) != count * dtype.itemsize:
        raise _invalid(
            f"{spec.name}.parameters.binary_data_size",
            "binary_data_size",
            f"{count} {spec.datatype} values are {count * dtype.itemsize} bytes, got {len(raw)}",
        )
    return np.frombuffer(raw, dtype=dtype)


def _strings(spec: TensorSpec, raw: memoryview, count: int) -> list[str]:
    """BYTES in the binary extension: each element a little-endian uint32 length, then its bytes."""
    out: list[str] = []
    at = 0
    try:
        for _ in range(count):
            (length,) = struct.unpack_from("<I", raw, at)
            at += 4
            if at + length > len(raw):
                raise ValueError
            out.append(str(raw[at : at + length], "utf-8"))
            at += length
    except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
        raise _invalid(
            f"{spec.name}.parameters.binary_data_size",
            "binary_bytes",
            f"{count} length-prefixed UTF-8 strings",
        ) from None
    if at != len(raw):
        raise _invalid(f"{spec.name}.parameters.binary_data_size", "binary_bytes", "bytes left over")
    return out


_V2_NAMES = FieldNames(
    users="user_id",
    offsets=lambda i: f"offsets[{i + 1}]",
    event=lambda _u, _e, j, name: f"{name}[{j}]",
    as_of=lambda i: f"as_of[{i}]",
    all_offsets="offsets",
    all_events="timestamp, amount, quantity",
)


def history_columns(
    tensors: Mapping[str, Tensor], *, now: int, max_users: int, max_events: int
) -> EventColumns:
    """The histories model's inputs as checked columns: the columnar body's rules and errors."""
    users = tensors["user_id"]
    assert isinstance(users, list)
    if len(users) > max_users:
        raise too_many_users(max_users, "user_id")
    as_of = tensors.get("as_of")
    return columns_from_arrays(
        users,
        np.asarray(tensors["offsets"], dtype=np.int64),
        np.asarray(tensors["timestamp"], dtype=np.float64),
        np.asarray(tensors["amount"], dtype=np.float64),
        np.asarray(tensors["quantity"], dtype=np.float64),
        np.full(len(users), math.nan) if as_of is None else np.asarray(as_of, dtype=np.float64),
        now=now,
        max_users=max_users,
        max_events=max_events,
        names=_V2_NAMES,
    )


def features_tensor(tensors: Mapping[str, Tensor], *, max_users: int) -> NDArray[np.float32]:
    """The features model's input, ``[n, bins, channels]`` finite float32."""
    features = tensors["features"]
    assert isinstance(features, np.ndarray)
    n = features.shape[0]
    if n > max_users:
        raise too_many_users(max_users, "features")
    if n == 0:
        raise _invalid("features.shape", "too_short", "at least one row is needed")
    if not np.all(np.isfinite(features)):
        raise _invalid("features.data", "finite_number", "features must be finite numbers")
    return np.asarray(features, dtype=np.float32)


# --- answers --------------------------------------------------------------------------------------


def _is_true(parameters: dict[str, Any] | None, key: str) -> bool | None:
    value = (parameters or {}).get(key)
    return value if isinstance(value, bool) else None


def infer_response(
    request: InferenceRequest,
    *,
    model_name: str,
    model_version: str,
    probabilities: NDArray[np.float32],
    threshold: float,
    horizon_days: int,
) -> tuple[bytes, int | None]:
    """The answer's bytes and, when some output is binary, the JSON part's length (the header)."""
    values: dict[str, NDArray[Any]] = {
        "probability": probabilities,
        # compared in float64, as /predict/batch compares the widened float32
        "will_purchase": probabilities.astype(np.float64) >= threshold,
    }
    binary_default = _is_true(request.parameters, "binary_data_output") or False
    if request.outputs is None:
        chosen = [(spec, binary_default) for spec in OUTPUTS]
    else:
        specs = {s.name: s for s in OUTPUTS}
        chosen = []
        for i, asked in enumerate(request.outputs):
            spec = specs.get(asked.name)
            if spec is None:
                raise _invalid(
                    f"outputs[{i}].name", "unknown_output", f"this model's outputs are {list(specs)}"
                )
            binary = _is_true(asked.parameters, "binary_data")
            chosen.append((spec, binary_default if binary is None else binary))
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for spec, binary in chosen:
        array = values[spec.name]
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if binary:
            raw = array.astype(_NUMPY[spec.datatype], copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.tolist()
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        answer["id"] = request.id
    answer["parameters"] = {"threshold": threshold, "horizon_days": horizon_days}
    answer["outputs"] = outputs
    head = json.dumps(answer, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def model_metadata(name: str, version: str, spec: FeatureSpec) -> ModelMetadataResponse:
    return ModelMetadataResponse(
        name=name,
        versions=[version],
        platform=PLATFORM,
        inputs=[TensorMetadata(**t.describe()) for t in input_specs(name, spec)],
        outputs=[TensorMetadata(**t.describe()) for t in OUTPUTS],
    )
