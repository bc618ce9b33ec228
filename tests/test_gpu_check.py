"""The GPU check's own parts, run where there is no GPU: placement read from onnxruntime's profile,
the answer comparison and the service comparison (CPU against CPU here), and the refusal to run
without the CUDA provider. On a GPU machine `make gpu-check` runs them against CUDA."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from bench import gpu_check
from tests.service.onnx_models import write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "model.onnx")


def test_placement_lists_every_node_by_provider(model: Path) -> None:
    batch = gpu_check.features(model, 8)
    where = gpu_check.placement(model, gpu_check.CPU, batch)
    assert set(where.by_provider) == {gpu_check.CPU}
    assert sum(where.by_provider.values()) > 1
    assert where.elsewhere == []
    # judged against a provider the nodes did not run on, every node is listed
    other = gpu_check.placed(gpu_check.profile(model, gpu_check.CPU, batch), gpu_check.CUDA)
    assert other.by_provider == where.by_provider
    assert len(other.elsewhere) == sum(where.by_provider.values())
    assert all(line.endswith(f"on {gpu_check.CPU}") for line in other.elsewhere)


def test_answers_are_compared_within_the_tolerance(model: Path) -> None:
    assert gpu_check.max_difference(model, gpu_check.CPU, gpu_check.features(model, 16)) == 0.0


@pytest.mark.slow
def test_the_service_comparison_runs_two_services(model: Path, tmp_path: Path) -> None:
    provider, difference = gpu_check.service_check(model, tmp_path, gpu_env={"PI_PROVIDERS": "cpu"})
    assert provider == gpu_check.CPU
    assert difference == 0.0


def test_without_the_cuda_provider_it_stops_naming_the_fix(
    model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if gpu_check.CUDA in ort.get_available_providers():
        pytest.skip("this machine has CUDA: make gpu-check runs the real thing")
    assert gpu_check.main(["--model", str(model)]) == 2
    assert "make gpu-env" in capsys.readouterr().err
