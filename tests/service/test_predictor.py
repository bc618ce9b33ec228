"""The onnxruntime predictor: load-time validation, providers, padding, warm-up (synthetic graphs)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from service.artifact import ArtifactError, ModelMetadata, TensorSignature, check_signature
from service.config import Settings
from service.features import FeatureSpec
from service.predictor import (
    OnnxPredictor,
    ProviderError,
    RuntimeInfo,
    batch_sizes,
    choose_providers,
    load_predictor,
)
from tests.service.fakes import SPEC, make_metadata, reference_probability
from tests.service.onnx_models import write_model

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def settings_for(path: Path, **overrides: object) -> Settings:
    return Settings(model_path=path, providers=(CPU,), max_batch_users=16, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model.onnx")


def test_batch_sizes_are_powers_of_two_then_the_maximum() -> None:
    assert batch_sizes(1) == (1,)
    assert batch_sizes(8) == (1, 2, 4, 8)
    assert batch_sizes(1000) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)


def test_loads_validates_and_predicts_every_batch_size(model_path: Path) -> None:
    predictor = load_predictor(settings_for(model_path))
    assert predictor.metadata == make_metadata()
    assert predictor.runtime == RuntimeInfo(requested=(CPU,), active=(CPU,), batch_sizes=(1, 2, 4, 8, 16))
    rng = np.random.default_rng(0)
    for n in (1, 3, 16, 17, 40):  # exact, padded, exact maximum, chunked past the maximum
        features = rng.random((n, *SPEC.shape), dtype=np.float32)
        got = predictor.predict(features)
        assert got.dtype == np.float32
        assert got.shape == (n,)
        np.testing.assert_allclose(got, reference_probability(features), rtol=0, atol=1e-6)


def test_inference_batch_users_caps_one_call_and_slices_larger_batches(model_path: Path) -> None:
    predictor = load_predictor(settings_for(model_path, inference_batch_users=4))
    assert predictor.runtime.batch_sizes == (1, 2, 4)  # the largest shape warmed up is the cap
    features = np.random.default_rng(2).random((11, *SPEC.shape), dtype=np.float32)
    np.testing.assert_allclose(
        predictor.predict(features), reference_probability(features), rtol=0, atol=1e-6
    )
    # a cap above the request limit changes nothing: no call is ever larger than a request
    assert load_predictor(settings_for(model_path, inference_batch_users=1000)).runtime.batch_sizes[-1] == 16


def test_padding_does_not_change_a_row(model_path: Path) -> None:
    predictor = load_predictor(settings_for(model_path))
    features = np.random.default_rng(1).random((5, *SPEC.shape), dtype=np.float32)
    alone = np.concatenate([predictor.predict(features[i : i + 1]) for i in range(5)])
    assert np.array_equal(predictor.predict(features), alone)


def test_no_model_path_is_a_clear_error() -> None:
    with pytest.raises(ArtifactError, match="no model configured"):
        load_predictor(Settings())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_predictor(settings_for(tmp_path / "nope.onnx"))


def test_not_an_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"definitely not protobuf" * 10)
    with pytest.raises(ArtifactError, match="cannot load"):
        load_predictor(settings_for(path))


def test_model_without_our_metadata(tmp_path: Path) -> None:
    path = write_model(tmp_path / "model.onnx", props={"model_version": "x"})
    with pytest.raises(ArtifactError, match="no 'purchase_intent' metadata"):
        load_predictor(settings_for(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch": 4}, "fixed batch size 4"),
        ({"input_name": "x"}, "expected exactly one named 'features'"),
        ({"output_name": "score"}, "expected one named 'probability'"),
        ({"shape": (9, 3)}, "feature spec gives"),
    ],
    ids=["fixed-batch", "input-name", "output-name", "spec-mismatch"],
)
def test_graph_that_disagrees_with_its_metadata_is_refused(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    path = write_model(tmp_path / "model.onnx", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match=message):
        load_predictor(settings_for(path))


SIG_META: ModelMetadata = make_metadata(FeatureSpec(lookback_bins=4, bin_days=7, channels=("purchases",)))
GOOD_IN = [TensorSignature("features", "tensor(float)", ("batch", 4, 1))]
GOOD_OUT = [TensorSignature("probability", "tensor(float)", ("batch",))]


def test_check_signature_accepts_named_and_unnamed_dynamic_batch() -> None:
    check_signature(SIG_META, GOOD_IN, GOOD_OUT)
    check_signature(SIG_META, [TensorSignature("features", "tensor(float)", (None, 4, 1))], GOOD_OUT)


@pytest.mark.parametrize(
    ("inputs", "outputs"),
    [
        pytest.param([TensorSignature("features", "tensor(float)", ("batch", 4))], GOOD_OUT, id="rank"),
        pytest.param([TensorSignature("features", "tensor(double)", ("batch", 4, 1))], GOOD_OUT, id="dtype"),
        pytest.param(
            [*GOOD_IN, TensorSignature("mask", "tensor(float)", ("batch", 4))], GOOD_OUT, id="two-inputs"
        ),
        pytest.param(GOOD_IN, [TensorSignature("probability", "tensor(float)", ("batch", 1))], id="out-rank"),
        pytest.param(GOOD_IN, [TensorSignature("probability", "tensor(int64)", ("batch",))], id="out-dtype"),
    ],
)
def test_check_signature_refuses(inputs: list[TensorSignature], outputs: list[TensorSignature]) -> None:
    with pytest.raises(ArtifactError):
        check_signature(SIG_META, inputs, outputs)


def test_providers_follow_the_preference_list() -> None:
    assert choose_providers((CUDA, CPU), [CPU]) == (CPU,)
    assert choose_providers((CUDA, CPU), [CUDA, CPU]) == (CUDA, CPU)
    assert choose_providers((CPU, CUDA), [CUDA, CPU]) == (CPU, CUDA)
    with pytest.raises(ProviderError, match="none of the execution providers"):
        choose_providers((CUDA,), [CPU])


def test_silent_cuda_fallback_is_detected_and_logged(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Pretend this build offers CUDA: onnxruntime is asked for it, cannot load it, runs on CPU."""
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: [CUDA, CPU])
    settings = Settings(model_path=model_path, providers=(CUDA, CPU), max_batch_users=4)
    with caplog.at_level(logging.WARNING, logger="service.predictor"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime's own warning about the missing CUDA provider
        predictor = OnnxPredictor.load(model_path, settings)
    assert predictor.runtime.requested == (CUDA, CPU)
    assert predictor.runtime.provider == CPU
    assert predictor.runtime.fallback
    assert any("fell back" in r.getMessage() for r in caplog.records)


# onnxruntime's own warning that the CUDA provider asked for is missing: the situation under test
@pytest.mark.filterwarnings(
    "ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names:UserWarning"
)
def test_require_gpu_refuses_a_cpu_session(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProviderError, match="GPU provider is required"):
        OnnxPredictor.load(model_path, settings_for(model_path, require_gpu=True))
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: [CUDA, CPU])
    settings = Settings(model_path=model_path, providers=(CUDA, CPU), require_gpu=True)
    with pytest.raises(ProviderError, match="runs on CPUExecutionProvider"):
        OnnxPredictor.load(model_path, settings)


def test_runtime_info_fallback() -> None:
    assert not RuntimeInfo((CPU,), (CPU,), (1,)).fallback
    assert RuntimeInfo((CUDA, CPU), (CPU,), (1,)).fallback
    assert not RuntimeInfo((CUDA, CPU), (CUDA, CPU), (1,)).fallback
