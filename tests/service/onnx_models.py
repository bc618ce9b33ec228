"""Tiny synthetic ONNX graphs for predictor tests (the end-to-end tests use the real exported model).

Built with ``onnx.helper`` so the tests can also produce broken models on purpose: a fixed batch
size, a wrong input name, missing metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.artifact import ModelMetadata
from tests.service.fakes import make_metadata


def write_model(
    path: Path,
    *,
    metadata: ModelMetadata | None = None,
    batch: int | str = "batch",
    input_name: str = "features",
    output_name: str = "probability",
    shape: tuple[int, int] | None = None,
    props: dict[str, str] | None = None,
    bias: float = -0.5,
) -> Path:
    """``probability = sigmoid(mean(features over time and channels) + bias)``, float32 [batch]."""
    meta = metadata if metadata is not None else make_metadata()
    bins, channels = shape if shape is not None else meta.feature_spec.shape
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], np.array([1, 2], dtype=np.int64))
    bias_init = helper.make_tensor("bias", TensorProto.FLOAT, [], np.array([bias], dtype=np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", [input_name, "axes"], ["mean"], keepdims=0),
            helper.make_node("Add", ["mean", "bias"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], [output_name]),
        ],
        "synthetic",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, bins, channels])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch])],
        initializer=[axes, bias_init],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, props if props is not None else meta.to_props())
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path
