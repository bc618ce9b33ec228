"""The model file's metadata: what the exporter writes and the service reads back.

The ONNX file is self-describing: everything the service needs to featurise a request and to
interpret the output travels in ``metadata_props``. One JSON document under :data:`METADATA_KEY`
is the source of truth; a few flat keys are copies for humans (``onnx`` CLI, Netron).

This module is deliberately free of onnx, onnxruntime and torch imports: the exporter builds the
property map and writes it with ``onnx``; the service reads the map from
``InferenceSession.get_modelmeta().custom_metadata_map`` and validates it here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.drift import ScoreReference
from service.features import FeatureSpec

METADATA_KEY = "purchase_intent"
FORMAT_VERSION = 1
INPUT_NAME = "features"
OUTPUT_NAME = "probability"


class ArtifactError(ValueError):
    """The model file is missing metadata or disagrees with what this code can serve."""


@dataclass(frozen=True)
class ModelMetadata:
    """Everything about a model that is not weights.

    ``normalisation`` is informational: the per-channel mean/std are baked into the graph as its
    first operation, so the service feeds raw encoder output and can never normalise differently.
    """

    model_version: str
    created_at: str  # RFC 3339, UTC
    feature_spec: FeatureSpec
    threshold: float  # decision threshold on the probability, chosen on validation (max F1)
    horizon_weeks: int  # the label window: at least one purchase in (as_of, as_of + horizon]
    protocol: str  # "customer-split" | "out-of-time"
    cutoff: str  # evaluation cutoff date, YYYY-MM-DD
    data_fingerprint: str  # sha256 of the cleaned training log
    normalisation: dict[str, list[float]] = field(default_factory=dict)
    training_metrics: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    opset: int = 0
    n_seeds: int = 1
    format_version: int = FORMAT_VERSION
    # the evaluation users' scores, for drift; files exported before it was added have none
    score_reference: ScoreReference | None = None

    @property
    def horizon_days(self) -> int:
        return self.horizon_weeks * 7

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "model_version": self.model_version,
            "created_at": self.created_at,
            "feature_spec": self.feature_spec.to_dict(),
            "threshold": self.threshold,
            "horizon_weeks": self.horizon_weeks,
            "horizon_days": self.horizon_days,
            "protocol": self.protocol,
            "cutoff": self.cutoff,
            "data_fingerprint": self.data_fingerprint,
            "normalisation": self.normalisation,
            "training_metrics": self.training_metrics,
            "hyperparameters": self.hyperparameters,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "opset": self.opset,
            "n_seeds": self.n_seeds,
        }
        if self.score_reference is not None:  # absent, not null: older readers see the same document
            out["score_reference"] = self.score_reference.to_dict()
        return out

    def to_props(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` map (string -> string)."""
        return {
            METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True, allow_nan=False),
            "model_version": self.model_version,
            "created_at": self.created_at,
            "threshold": repr(self.threshold),
            "horizon_weeks": str(self.horizon_weeks),
            "data_fingerprint": self.data_fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMetadata:
        try:
            version = int(data["format_version"])
            if version != FORMAT_VERSION:
                raise ArtifactError(
                    f"model metadata format_version {version} is not supported "
                    f"(this code reads version {FORMAT_VERSION})"
                )
            meta = cls(
                model_version=str(data["model_version"]),
                created_at=str(data["created_at"]),
                feature_spec=FeatureSpec.from_dict(data["feature_spec"]),
                threshold=float(data["threshold"]),
                horizon_weeks=int(data["horizon_weeks"]),
                protocol=str(data["protocol"]),
                cutoff=str(data["cutoff"]),
                data_fingerprint=str(data["data_fingerprint"]),
                normalisation={k: [float(x) for x in v] for k, v in data.get("normalisation", {}).items()},
                training_metrics=dict(data.get("training_metrics", {})),
                hyperparameters=dict(data.get("hyperparameters", {})),
                input_name=str(data.get("input_name", INPUT_NAME)),
                output_name=str(data.get("output_name", OUTPUT_NAME)),
                opset=int(data.get("opset", 0)),
                n_seeds=int(data.get("n_seeds", 1)),
                format_version=version,
                score_reference=None
                if data.get("score_reference") is None
                else ScoreReference.from_dict(data["score_reference"]),
            )
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            missing = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ArtifactError(f"invalid model metadata: {missing}") from exc
        if not (0.0 <= meta.threshold <= 1.0) or math.isnan(meta.threshold):
            raise ArtifactError(f"invalid model metadata: threshold {meta.threshold} not in [0, 1]")
        if meta.horizon_weeks < 1:
            raise ArtifactError(f"invalid model metadata: horizon_weeks {meta.horizon_weeks} < 1")
        return meta

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ModelMetadata:
        """Parse and validate the ``metadata_props`` map of a model file."""
        raw = props.get(METADATA_KEY)
        if raw is None:
            raise ArtifactError(
                f"model file has no '{METADATA_KEY}' metadata: not a purchase-intent model export"
            )
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"model metadata '{METADATA_KEY}' is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ArtifactError(f"model metadata '{METADATA_KEY}' is not a JSON object")
        return cls.from_dict(data)


#: onnxruntime's type string for float32 tensors (``NodeArg.type``).
FLOAT_TENSOR = "tensor(float)"


@dataclass(frozen=True)
class TensorSignature:
    """One graph input or output as the runtime reports it: plain values, no onnxruntime types.

    ``shape`` holds an int for a fixed dimension and a str (the symbolic name) or None for a dynamic
    one, exactly as ``onnxruntime.NodeArg.shape`` does.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


def _is_dynamic(dim: int | str | None) -> bool:
    return dim is None or isinstance(dim, str) or dim < 0


def check_signature(
    meta: ModelMetadata,
    inputs: Sequence[TensorSignature],
    outputs: Sequence[TensorSignature],
) -> None:
    """Refuse a model whose graph does not match its own metadata.

    The service feeds exactly one ``float32 [batch, lookback_bins, n_channels]`` tensor and reads
    one ``float32 [batch]`` output; a graph exported with a fixed batch, other names or a feature
    spec that disagrees with its metadata would fail on the first request (or, worse, silently
    broadcast), so it is caught at load time instead. Raises :class:`ArtifactError`.
    """
    expected = (meta.input_name, *meta.feature_spec.shape)
    if [i.name for i in inputs] != [meta.input_name]:
        raise ArtifactError(
            f"model inputs are {[i.name for i in inputs]}; expected exactly one named '{meta.input_name}'"
        )
    (inp,) = inputs
    if inp.dtype != FLOAT_TENSOR:
        raise ArtifactError(f"input '{inp.name}' is {inp.dtype}; expected {FLOAT_TENSOR}")
    if len(inp.shape) != 3:
        raise ArtifactError(
            f"input '{inp.name}' has shape {list(inp.shape)}; expected [batch, {expected[1]}, {expected[2]}]"
        )
    if not _is_dynamic(inp.shape[0]):
        raise ArtifactError(
            f"input '{inp.name}' has a fixed batch size {inp.shape[0]}; export with a dynamic batch axis"
        )
    if tuple(inp.shape[1:]) != meta.feature_spec.shape:
        raise ArtifactError(
            f"input '{inp.name}' has shape {list(inp.shape)} but the metadata's feature spec gives "
            f"[batch, {expected[1]}, {expected[2]}]"
        )
    by_name = {o.name: o for o in outputs}
    out = by_name.get(meta.output_name)
    if out is None:
        raise ArtifactError(f"model outputs are {sorted(by_name)}; expected one named '{meta.output_name}'")
    if out.dtype != FLOAT_TENSOR:
        raise ArtifactError(f"output '{out.name}' is {out.dtype}; expected {FLOAT_TENSOR}")
    if len(out.shape) != 1 or not _is_dynamic(out.shape[0]):
        raise ArtifactError(f"output '{out.name}' has shape {list(out.shape)}; expected [batch]")
