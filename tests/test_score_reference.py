"""The drift reference in the model file: ``train`` writes it, ``export`` keeps or adds it, and
the graph never changes for it."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model_export.export import read_metadata, with_metadata
from service.drift import ScoreReference
from tests.conftest import TinyModel, run_cli


@pytest.mark.slow
def test_a_reference_is_written_by_train_and_can_be_added_to_an_older_file(
    tiny_model_dir: TinyModel, tmp_path: Path
) -> None:
    """``train`` puts the drift reference in the file; ``export --model`` adds one to a file that
    has none (its checkpoint may be too old to export), the graph and the answers unchanged."""
    meta = read_metadata(tiny_model_dir.model)
    assert meta.score_reference is not None
    proto = onnx.load(str(tiny_model_dir.model))
    older = tmp_path / "older.onnx"
    older.write_bytes(
        with_metadata(proto, dataclasses.replace(meta, score_reference=None)).SerializeToString()
    )
    assert read_metadata(older).score_reference is None
    out = tmp_path / "stamped.onnx"
    proc = run_cli(
        "export", "--model", str(older), "--reference-scores", str(tiny_model_dir.scores), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tiny_model_dir.scores.open() as fh:
        scores = [float(r["probability"]) for r in csv.DictReader(fh)]
    assert read_metadata(out).score_reference == ScoreReference.of(scores)
    assert onnx.load(str(out)).graph == proto.graph
    features = np.random.default_rng(0).random((16, *meta.feature_spec.shape), dtype=np.float32)
    answers = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"features": features})[
            0
        ]
        for path in (tiny_model_dir.model, out)
    ]
    assert np.array_equal(answers[0], answers[1])
    alone = run_cli("export", "--model", str(older), "--out", str(tmp_path / "x.onnx"))
    assert alone.returncode == 2
    assert "--reference-scores" in alone.stderr
