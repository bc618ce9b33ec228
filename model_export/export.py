"""ONNX export as a contract (after timm's ``onnx.py``): eval mode, named input and output, a dynamic
batch axis traced with batch >= 2, a pinned opset, ``check_model(full_check=True)``, numeric parity
against onnxruntime, metadata inside the one file, and an atomic write.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Iterable, Iterator
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray

from model_export.files import write_atomic
from model_export.model import CLN, CLNConfig, Ensemble, FusedEnsemble
from service.artifact import INPUT_NAME, OUTPUT_NAME, ModelMetadata
from service.drift import ScoreReference

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-5
#: Held-out rows the checkpoint keeps for the parity check of a rebuilt ONNX file.
PARITY_ROWS = 512


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees with PyTorch."""


def to_onnx(model: torch.nn.Module, example: NDArray[np.float32], opset: int) -> onnx.ModelProto:
    """Trace ``model`` into an in-memory ONNX model with a dynamic batch axis and no external data."""
    model.eval()
    if example.shape[0] < 2:
        raise ValueError("trace with a batch of at least 2, so the batch axis cannot be specialised to 1")
    batch = torch.export.Dim("batch", min=1, max=1 << 24)
    # The dynamo exporter prints its progress to stdout; keep the CLI's output to our own lines.
    with redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model,
            (torch.from_numpy(example),),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"features": {0: batch}},
            opset_version=opset,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto: onnx.ModelProto = program.model_proto
    return proto


def run_onnx(
    proto: onnx.ModelProto, inputs: NDArray[np.float32] | Iterable[NDArray[np.float32]]
) -> NDArray[np.float32]:
    """Score ``inputs`` (one array, or several scored in turn) with onnxruntime on CPU: the numbers
    the service will produce."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in _parts(inputs)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _parts(inputs: NDArray[np.float32] | Iterable[NDArray[np.float32]]) -> Iterator[NDArray[np.float32]]:
    return iter([inputs]) if isinstance(inputs, np.ndarray) else iter(inputs)


def parity(
    model: torch.nn.Module,
    proto: onnx.ModelProto,
    inputs: NDArray[np.float32] | Iterable[NDArray[np.float32]],
    expected: NDArray[np.float64] | None = None,
) -> float:
    """Max absolute difference between PyTorch and onnxruntime (CPU) on ``inputs`` (one array, or
    several compared in turn: a whole test set's activations at once would be many times its size).
    ``expected``: ``model``'s outputs on all of ``inputs`` when the caller has them already."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    worst, done = 0.0, 0
    for x in _parts(inputs):
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        if expected is None:
            with torch.no_grad():
                want = model(torch.from_numpy(x)).numpy()
        else:
            want = expected[done : done + x.shape[0]]
        done += x.shape[0]
        if got.shape != want.shape:
            raise ExportError(f"onnxruntime output shape {got.shape} != PyTorch {want.shape}")
        if x.size:
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))))
    if expected is not None and done != expected.size:
        raise ExportError(f"{expected.size} expected outputs for {done} inputs")
    return worst


def with_metadata(proto: onnx.ModelProto, metadata: ModelMetadata) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    del out.metadata_props[:]
    onnx.helper.set_model_props(out, metadata.to_props())
    out.producer_name = "purchase-intent"
    out.doc_string = (
        "Purchase-intent correlation-learning network: features float32 [batch, lookback_bins, "
        "channels] (raw service.features.encode_batch output) -> probability float32 [batch] of at "
        f"least one purchase within {metadata.horizon_weeks} weeks."
    )
    onnx.checker.check_model(out, full_check=True)
    return out


def export_ensemble(
    ensemble: Ensemble,
    inputs: NDArray[np.float32] | Iterable[NDArray[np.float32]],
    opset: int,
    *,
    expected: NDArray[np.float64] | None = None,
) -> tuple[onnx.ModelProto, float]:
    """Trace the fused serving form of ``ensemble`` and check it against the trained ensemble (not
    against itself) on ``inputs`` (one array or slices; ``expected``: the ensemble's outputs on them,
    when already computed); returns the graph without metadata and the parity."""
    served = FusedEnsemble(ensemble).eval()
    parts = _parts(inputs)
    first = next(parts)
    proto = to_onnx(served, first[: min(8, first.shape[0])], opset)
    diff = parity(ensemble, proto, itertools.chain([first], parts), expected)
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"onnxruntime disagrees with PyTorch by {diff:.3g} > {PARITY_TOLERANCE}")
    return proto, diff


def save_checkpoint(
    path: Path,
    ensemble: Ensemble,
    net_cfg: CLNConfig,
    metadata: ModelMetadata,
    hyperparameters: dict[str, Any],
    held_out: NDArray[np.float32],
) -> None:
    """What :func:`export_checkpoint` rebuilds the ONNX file from, with its first held-out inputs."""
    torch.save(
        {
            "hyperparameters": hyperparameters,
            "cln_config": net_cfg.to_dict(),
            "state_dict": ensemble.state_dict(),
            "metadata": metadata.to_dict(),
            # held-out inputs, so `export` can check a rebuilt file against the weights alone
            "parity_inputs": torch.from_numpy(held_out[:PARITY_ROWS].copy()),
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[Ensemble, ModelMetadata, NDArray[np.float32]]:
    """The trained ensemble, its metadata and the held-out inputs kept for the parity check."""
    ckpt = torch.load(path, weights_only=True)
    meta = ModelMetadata.from_dict(ckpt["metadata"])
    cfg = CLNConfig(**ckpt["cln_config"])
    ensemble = Ensemble([CLN(cfg) for _ in range(meta.n_seeds)])
    ensemble.load_state_dict(ckpt["state_dict"])
    inputs = ckpt.get("parity_inputs")
    if inputs is None:
        raise ExportError(f"{path} has no parity inputs: retrain to write a checkpoint that can be exported")
    return ensemble.eval(), meta, inputs.numpy()


def export_checkpoint(path: Path, out: Path, reference: ScoreReference | None = None) -> float:
    """Rebuild the ONNX file from ``checkpoint.pt`` (same graph, same metadata); returns the parity.

    ``reference`` replaces the metadata's score reference (a checkpoint written before references
    existed has none); the graph, and so every answer, stays the same."""
    ensemble, meta, inputs = load_checkpoint(path)
    if reference is not None:
        meta = replace(meta, score_reference=reference)
    proto, diff = export_ensemble(ensemble, inputs, meta.opset)
    write_atomic(with_metadata(proto, meta).SerializeToString(), out)
    return diff


def add_reference(model: Path, out: Path, reference: ScoreReference) -> None:
    """Write ``model`` again with ``reference`` in its metadata, for a file whose checkpoint cannot
    be exported again: the same graph (checked byte for byte), so the same answers."""
    proto = onnx.load(str(model))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    stamped = with_metadata(proto, replace(meta, score_reference=reference))
    if stamped.graph.SerializeToString() != proto.graph.SerializeToString():
        raise ExportError("the graph changed while the metadata was rewritten")
    write_atomic(stamped.SerializeToString(), out)


def read_metadata(path: Path) -> ModelMetadata:
    """Metadata of an exported file, read the way the service reads it (through onnxruntime)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
